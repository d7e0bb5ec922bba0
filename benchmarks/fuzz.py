"""The big robustness run: N mutated inputs through graphslim, each in a worker process.

Files come from tests/fuzzing.py's mutators: ONNX models (truncations, bit flips, protobuf edits:
wrong op types and opsets, missing initializers, cycles, huge and wrong dims, external data
pointing outside the folder, ...), ``.npz`` data sets (forged headers, object arrays, NaN, labels
out of range, bzip2 members, ...) and recipes (deep nesting, huge integers, YAML alias bombs, bytes
that are not UTF-8, ...). Seeds: the bundled example, two test architectures, and the hostile
inputs of ``tests/corpus/`` (a ConstantOfShape bomb, zip bombs, ...). Models go through
``inspect`` and ``optimize``, data sets through ``eval`` and ``optimize --data``, recipes through
``optimize --recipe``. Workers are subprocesses under a 3 GiB address-space limit, so a crash (a
segfault in a native library) or a bomb that gets through is caught and named. Prints the counts
and every file that broke a promise (exit 1, a traceback, an error of more than one line, a hang
past the limit, a changed input, a half-written output, a temporary left beside it or in TMPDIR,
a crash); exits 1 if there was any.

    nice -n 10 python benchmarks/fuzz.py --n 10000 --workers 2 --seed 18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
sys.path.insert(0, str(ROOT / "tests"))

WORKER = r"""
import json, os, resource, sys, tempfile
from pathlib import Path
limit = 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[3])
from fuzzing import check_data_file, check_file, check_recipe_file
work = Path(sys.argv[2])
check = {".onnx": check_file, ".npz": check_data_file, ".json": check_recipe_file, ".yaml": check_recipe_file}
for line in open(sys.argv[1]):
    path = Path(line.strip())
    print(json.dumps({"start": path.name}), flush=True)
    try:
        problems = check[path.suffix](path, work, timeout_s=60)
    except MemoryError:
        problems = ["MemoryError outside graphslim's handling (a bomb got through?)"]
    print(json.dumps({"file": path.name, "problems": problems}), flush=True)
"""

RECIPES = [
    (".json", b'{"passes": ["fold-batchnorm", {"name": "prune-channels", "options": {"ratio": 0.5}}]}'),
    (".yaml", b"passes:\n  - fold-batchnorm\n  - name: prune-channels\n    options:\n      ratio: 0.5\n"),
]


def _seeds() -> tuple[list[bytes], list[bytes], list[tuple[str, bytes]]]:
    from models import plain_cnn, resnet

    models = [
        (ROOT / "examples" / "digits" / "model.onnx").read_bytes(),
        plain_cnn().SerializeToString(),
        resnet().SerializeToString(),
        *(p.read_bytes() for p in sorted(CORPUS.glob("*.onnx"))),
    ]
    data = [
        (ROOT / "examples" / "digits" / "data.npz").read_bytes(),
        *(p.read_bytes() for p in sorted(CORPUS.glob("*.npz"))),
    ]
    recipes = [
        *RECIPES,
        *((p.suffix, p.read_bytes()) for p in sorted(CORPUS.glob("*.json")) + sorted(CORPUS.glob("*.yaml"))),
    ]
    return models, data, recipes


def main() -> None:
    from fuzzing import data_mutants, mutants, recipe_mutants

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-fraction", type=float, default=0.1, help="share of .npz data sets among the files")
    ap.add_argument("--recipe-fraction", type=float, default=0.1, help="share of recipes among the files")
    args = ap.parse_args()
    models, data, recipes = _seeds()
    n_data, n_recipes = int(args.n * args.data_fraction), int(args.n * args.recipe_fraction)
    n_models = args.n - n_data - n_recipes
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="graphslim-fuzz-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "corpus").mkdir()
        files = []
        for prefix, suffix, gen in (
            ("m", ".onnx", mutants(models, n_models, args.seed)),
            ("d", ".npz", data_mutants(data, n_data, args.seed)),
            ("r", "", recipe_mutants(recipes, n_recipes, args.seed)),
        ):
            for name, blob in gen:
                p = tmpd / "corpus" / f"{prefix}{name}{suffix}"
                p.write_bytes(blob)
                files.append(p)
        files.sort(key=lambda p: p.name[1:])  # interleave the kinds across workers
        procs = []
        for w in range(args.workers):
            lst = tmpd / f"list{w}.txt"
            lst.write_text("\n".join(str(f) for f in files[w :: args.workers]) + "\n")
            work = tmpd / f"work{w}"
            work.mkdir()
            procs.append((_worker(lst, work), lst, work))
        results, findings = {}, {}
        pending = list(procs)
        while pending:
            for proc, lst, work in list(pending):
                line = proc.stdout.readline()
                if line:
                    rec = json.loads(line)
                    if "file" in rec:
                        results[rec["file"]] = rec["problems"]
                        if rec["problems"]:
                            findings[rec["file"]] = rec["problems"]
                    else:
                        proc.current = rec["start"]  # type: ignore[attr-defined]
                    continue
                proc.wait()
                pending.remove((proc, lst, work))
                if proc.returncode != 0:
                    name = getattr(proc, "current", "?")
                    findings[name] = [f"worker crashed (exit {proc.returncode})"]
                    done = set(results) | {name}
                    rest = [f for f in lst.read_text().split() if Path(f).name not in done]
                    if rest:  # carry on with the remaining files in a new worker
                        lst2 = lst.with_suffix(".rest")
                        lst2.write_text("\n".join(rest) + "\n")
                        pending.append((_worker(lst2, work), lst2, work))
        kinds: dict[str, int] = {}
        for name in results:
            what = {"m": "model", "d": "data", "r": "recipe"}[name[0]]
            kind = f"{what} {name.split('_')[1].split('.')[0]}"
            kinds[kind] = kinds.get(kind, 0) + 1
        print(
            f"{len(results)} of {args.n} files checked in {time.time() - t0:.0f} s with {args.workers} workers "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}); {len(findings)} with problems"
        )
        for name, probs in sorted(findings.items()):
            print(f"  {name}: {'; '.join(probs)}")
    sys.exit(1 if findings else 0)


def _worker(lst: Path, work: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(lst), str(work), str(ROOT / "tests")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )


if __name__ == "__main__":
    main()
