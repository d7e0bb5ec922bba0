"""The big robustness run: N mutated ONNX files through graphslim inspect and optimize.

Files come from tests/fuzzing.py's mutator (truncations, bit flips, protobuf edits: wrong op
types and opsets, missing initializers, cycles, huge and wrong dims, external data pointing
outside the folder, ...) applied to the bundled example and two test architectures. Workers are
subprocesses, so a crash (a segfault in a native library) is caught and named. Prints the counts
and every file that broke a promise (exit 1, a traceback, a hang past the limit, a changed input,
a half-written output, a leftover temporary, a crash); exits 1 if there was any.

    python benchmarks/fuzz.py --n 10000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

WORKER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from fuzzing import check_file
work = Path(sys.argv[2])
for line in open(sys.argv[1]):
    path = Path(line.strip())
    print(json.dumps({"start": path.name}), flush=True)
    print(json.dumps({"file": path.name, "problems": check_file(path, work, timeout_s=60)}), flush=True)
"""


def main() -> None:
    from fuzzing import mutants
    from models import plain_cnn, resnet

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seeds = [
        (ROOT / "examples" / "digits" / "model.onnx").read_bytes(),
        plain_cnn().SerializeToString(),
        resnet().SerializeToString(),
    ]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="graphslim-fuzz-") as tmp:
        tmpd = Path(tmp)
        files = []
        for name, data in mutants(seeds, args.n, args.seed):
            p = tmpd / "corpus" / f"{name}.onnx"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(data)
            files.append(p)
        procs = []
        for w in range(args.workers):
            lst = tmpd / f"list{w}.txt"
            lst.write_text("\n".join(str(f) for f in files[w :: args.workers]) + "\n")
            work = tmpd / f"work{w}"
            work.mkdir()
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, str(lst), str(work), str(ROOT / "tests")],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    ),
                    lst,
                    work,
                )
            )
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
                        current = rec["start"]
                        proc.current = current  # type: ignore[attr-defined]
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
                        p2 = subprocess.Popen(
                            [sys.executable, "-c", WORKER, str(lst2), str(work), str(ROOT / "tests")],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            text=True,
                        )
                        pending.append((p2, lst2, work))
        kinds = {}
        for name in results:
            kind = name.split("_")[1]
            kinds[kind] = kinds.get(kind, 0) + 1
        print(
            f"{len(results)} of {args.n} files checked in {time.time() - t0:.0f} s with {args.workers} workers "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}); {len(findings)} with problems"
        )
        for name, probs in sorted(findings.items()):
            print(f"  {name}: {'; '.join(probs)}")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
