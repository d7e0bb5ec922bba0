"""Mutated inputs for robustness testing, and the checks a run over them must pass.

``mutants(seed_models, n, seed)`` yields (name, bytes) pairs of ONNX files: truncations, bit
flips, and edits of the parsed protobuf (wrong op types, missing inputs and initializers, cycles,
bad and huge dims, wrong dtypes, opsets out of range, external data that points outside the model
folder, duplicate names, empty graphs). ``data_mutants`` and ``recipe_mutants`` do the same for
``.npz`` data sets (truncations, bit flips, forged .npy headers, object and string arrays, NaN,
labels out of range, bzip2 members) and JSON/YAML recipes (truncations, bit flips, deep nesting,
huge integers, alias bombs, unknown passes and options, bytes that are not UTF-8); the hostile
inputs in ``tests/corpus/`` are among their seeds.

``check_file`` (ONNX), ``check_data_file`` and ``check_recipe_file`` run graphslim on one file in
this process and report every broken promise: an internal error (exit 1) instead of a clear
input error, a traceback, an error message of more than one line or 2,000 characters, a changed
input file, a half-written output folder, a temporary left beside it or in TMPDIR, anything else
created in the work folder. The big run is ``benchmarks/fuzz.py``; tests keep a small fixed-seed
corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["check_data_file", "check_file", "check_recipe_file", "data_mutants", "mutants", "recipe_mutants"]

EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "digits" / "model.onnx"

_OPS = [
    "Conv",
    "Relu",
    "Gemm",
    "MatMul",
    "Add",
    "Concat",
    "Reshape",
    "Split",
    "Loop",
    "If",
    "NoSuchOp",
    "Identity",
    "BatchNormalization",
    "Flatten",
    "MaxPool",
    "Transpose",
    "Slice",
    "",
]


def _bitflip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _edit(model: onnx.ModelProto, rng: random.Random) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = rng.randrange(14)
    nodes = list(g.node)
    if kind == 0 and nodes:
        rng.choice(nodes).op_type = rng.choice(_OPS)
    elif kind == 1 and nodes:
        n = rng.choice(nodes)
        if n.input:
            del n.input[rng.randrange(len(n.input))]
    elif kind == 2 and g.initializer:
        del g.initializer[rng.randrange(len(g.initializer))]  # missing initializer
    elif kind == 3 and len(nodes) > 1:
        i, j = sorted(rng.sample(range(len(nodes)), 2))
        if nodes[i].input and nodes[j].output:
            nodes[i].input[0] = nodes[j].output[0]  # a cycle (or an out-of-order use)
    elif kind == 4:
        vis = list(g.input) + list(g.output) + list(g.value_info)
        if vis:
            dims = rng.choice(vis).type.tensor_type.shape.dim
            if dims:
                dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 2**40, 2**62, 7, 3])  # huge or wrong dims
    elif kind == 5 and g.initializer:
        init = rng.choice(list(g.initializer))
        if init.dims:
            init.dims[rng.randrange(len(init.dims))] = rng.choice([1, 2, 2**31, 0])  # shape and data disagree
    elif kind == 6:
        for imp in m.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = rng.choice([0, 1, 8, 22, 23, 99, 2**31 - 1])
    elif kind == 7:
        m.opset_import.add(domain=rng.choice(["com.evil", "ai.onnx.ml", ""]), version=rng.choice([1, 3, 50]))
    elif kind == 8 and g.initializer:
        init = rng.choice(list(g.initializer))
        init.ClearField("raw_data")
        del init.float_data[:]
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        init.external_data.add(
            key="location", value=rng.choice(["../../etc/passwd", "/etc/passwd", "missing.bin", "sub/../../x.bin", ""])
        )
        init.external_data.add(key="length", value=str(rng.choice([4, 2**40])))
    elif kind == 9 and nodes:
        rng.choice(nodes).output[0] = rng.choice(nodes).output[0]  # duplicate output names
    elif kind == 10:
        del g.node[:]
    elif kind == 11 and g.input:
        g.input[0].type.tensor_type.elem_type = rng.choice([0, TensorProto.STRING, TensorProto.INT64, 999])
    elif kind == 12 and nodes:
        n = rng.choice(nodes)
        n.attribute.add().CopyFrom(
            helper.make_attribute(
                rng.choice(["group", "axis", "kernel_shape", "pads", "perm"]),
                rng.choice([0, -5, 2**40, [0, 0], [1, -1, 3]]),
            )
        )
    else:
        m.ir_version = rng.choice([0, 1, 3, 11, 99])
    return m


def mutants(seeds: list[bytes], n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` deterministic mutants of the serialized seed models."""
    rng = random.Random(seed)
    parsed = [onnx.load_from_string(s) for s in seeds]
    for i in range(n):
        k = rng.randrange(len(seeds))
        how = rng.random()
        if how < 0.2:
            data = seeds[k][: rng.randrange(len(seeds[k]))]
            name = "trunc"
        elif how < 0.45:
            data = _bitflip(seeds[k], rng)
            name = "flip"
        else:
            m = parsed[k]
            for _ in range(rng.randint(1, 3)):
                m = _edit(m, rng)
            data = m.SerializeToString()
            name = "edit"
        yield f"{i:05d}_{name}", data


def _npz(arrays: dict[str, Any], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.save(member, arr, allow_pickle=True)
            zf.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


def _edit_npz(data: bytes, rng: random.Random) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if any(i.file_size > 64 * 2**20 for i in zf.infolist()):
                return _bitflip(data, rng)  # a bomb: never decompress it here
            arrays = {i.filename[:-4]: zf.read(i) for i in zf.infolist() if i.filename.endswith(".npy")}
        loaded = {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in arrays.items()}
    except Exception:  # noqa: BLE001 - a seed that is itself hostile: mutate its bytes instead
        return _bitflip(data, rng)
    if not loaded:
        return data
    name = rng.choice(sorted(loaded))
    arr = loaded[name]
    kind = rng.randrange(10)
    if kind == 0 and arr.dtype.kind == "f" and arr.size:
        arr = arr.copy()
        arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
    elif kind == 1:
        loaded["labels"] = np.array([rng.choice([-1, 10, 2**40, 7])] * len(arr), dtype=np.int64)
    elif kind == 2:
        arr = np.array([object()] * 2, dtype=object)
    elif kind == 3:
        arr = arr.astype(rng.choice(["U3", "complex64", "float16", "bool", "int8"]))
    elif kind == 4:
        arr = arr.reshape(-1) if arr.ndim > 1 else arr[None]
    elif kind == 5:
        arr = arr[: rng.randrange(max(1, len(arr)))] if arr.ndim else arr
    elif kind == 6:
        del loaded[name]
        loaded[rng.choice(["x", "", "input.npy", "../input"])] = arr
        return _npz(loaded)
    elif kind == 7:
        return _npz(loaded, zipfile.ZIP_BZIP2)
    elif kind == 8:
        raw = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            raw, {"descr": arr.dtype.str, "fortran_order": False, "shape": (rng.choice([2**31, 2**40, 7]),)}
        )  # a header that lies about the data after it
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"{name}.npy", raw.getvalue() + arr.tobytes()[:4096])
        return buf.getvalue()
    else:
        return data[: rng.randrange(len(data))]
    loaded[name] = arr
    return _npz(loaded)


def data_mutants(seeds: list[bytes], n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` deterministic mutants of ``.npz`` data sets."""
    rng = random.Random(seed)
    for i in range(n):
        base = seeds[rng.randrange(len(seeds))]
        how = rng.random()
        if how < 0.2:
            data, kind = base[: rng.randrange(len(base))], "trunc"
        elif how < 0.4:
            data, kind = _bitflip(base, rng), "flip"
        else:
            data, kind = _edit_npz(base, rng), "edit"
        yield f"{i:05d}_{kind}", data


def _edit_recipe(text: str, rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return "[" * rng.choice([40, 2000, 20000]) + "]" * rng.choice([0, 40, 2000, 20000])
    if kind == 1:
        return text.replace("0.5", rng.choice(["9" * 5000, "1e999", "-0", "NaN", "Infinity", "[]", '"x"']), 1)
    if kind == 2:
        lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
        for j in range(rng.randrange(2, 9)):
            lines.append(f"b{j}: &b{j} [{', '.join([f'*b{j - 1}' if j else '*a'] * 9)}]")
        lines.append(f"passes: *b{j}")
        return "\n".join(lines)
    if kind == 3:
        return text.replace("prune-channels", rng.choice(["no-such-pass", "", "x" * 100_000, "fold-constants"]), 1)
    if kind == 4:
        return text.replace("ratio", rng.choice(["rat", "exclude", "criterion", "\u0000", "r" * 5000]), 1)
    if kind == 5:
        return json.dumps({"passes": [{"name": "prune-channels", "options": {"exclude": [[["x"] * 50] * 50] * 20}}]})
    if kind == 6:
        return json.dumps([{"name": "fold-constants", "options": {"max_mib": rng.choice([0, -1, 1e-300, 2**70])}}])
    return text + rng.choice(["\n- !!python/object/apply:os.system ['true']", "\n{", "\u2028", "\n- 5"])


def recipe_mutants(seeds: list[tuple[str, bytes]], n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` deterministic mutants of recipes; names end in .json or .yaml."""
    rng = random.Random(seed)
    for i in range(n):
        suffix, base = seeds[rng.randrange(len(seeds))]
        how = rng.random()
        if how < 0.2:
            data, kind = base[: rng.randrange(len(base) + 1)], "trunc"
        elif how < 0.4:
            data, kind = _bitflip(base, rng) if base else base, "flip"
        else:
            data, kind = _edit_recipe(base.decode("utf-8", "replace"), rng).encode("utf-8", "surrogatepass"), "edit"
            if rng.random() < 0.1:
                data = data.decode("utf-8", "replace").encode("latin-1", "replace")
        yield f"{i:05d}_{kind}{suffix}", data


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _run(argv: list[str], timeout_s: int) -> tuple[Any, str]:
    from graphslim.cli import main

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    buf_out, buf_err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            code = main(argv)
    except _Timeout:
        code = "timeout"
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, buf_err.getvalue()


def _promises(argv: list[str], code: Any, err: str) -> list[str]:
    problems = []
    if code not in (0, 2, 3):
        problems.append(f"{argv[0]}: exit {code}: {err.strip().splitlines()[-1][:300] if err.strip() else ''}")
    if "Traceback" in err:
        problems.append(f"{argv[0]}: traceback on stderr")
    errors = [line for line in err.splitlines() if line.startswith("graphslim: error:")]
    if code == 2 and (len(errors) != 1 or len(errors[0]) > 2000):
        problems.append(f"{argv[0]}: error message of {len(errors)} lines / {len(err)} characters")
    return problems


@contextlib.contextmanager
def _private_tmpdir(work: Path) -> Iterator[Path]:
    """TMPDIR in ``work/.tmp`` for one check, so that what a run leaves there is its own."""
    import os
    import tempfile

    tmp = work / ".tmp"
    tmp.mkdir(exist_ok=True)
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(tmp), None
    try:
        yield tmp
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


def _leftovers(work: Path, out: Path, keep: set[str]) -> list[str]:
    """What a run left in ``work`` besides its inputs (``keep``) and output folder, and in TMPDIR."""
    problems = []
    if out.exists() and not ((out / "model.onnx").is_file() and (out / "report.json").is_file()):
        problems.append("half-written output folder")
    extra = sorted(p.name for p in work.iterdir() if p.name not in keep and p != out)
    if extra:
        problems.append(f"temporary or stray files left behind: {extra[:5]}")
    stray = sorted(p.name for p in (work / ".tmp").iterdir())
    if stray:
        problems.append(f"left in TMPDIR: {stray[:5]}")
    return problems


def check_file(path: Path, work: Path, *, timeout_s: int = 60) -> list[str]:
    """Run inspect and optimize on the ONNX file ``path``; return the broken promises (empty: all kept)."""
    with _private_tmpdir(work):
        return _check_model(path, work, timeout_s)


def _check_model(path: Path, work: Path, timeout_s: int) -> list[str]:
    problems = []
    keep = {p.name for p in work.iterdir()}
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = work / f"out-{path.stem}"
    for argv in (
        ["inspect", str(path), "--json"],
        [
            "optimize",
            str(path),
            "-o",
            str(out),
            "--no-latency",
            "--json",
            "--passes",
            "fold-constants,fold-batchnorm,prune-channels{ratio=0.3},eliminate-dead-nodes",
        ],
    ):
        code, err = _run(argv, timeout_s)
        problems += _promises(argv, code, err)
    if hashlib.sha256(path.read_bytes()).hexdigest() != before:
        problems.append("the input file changed")
    return problems + _leftovers(work, out, keep)


def check_data_file(path: Path, work: Path, *, model: Path = EXAMPLE_MODEL, timeout_s: int = 60) -> list[str]:
    """Run eval and optimize on the example model with the data set ``path``."""
    with _private_tmpdir(work):
        return _check_data(path, work, model, timeout_s)


def _check_data(path: Path, work: Path, model: Path, timeout_s: int) -> list[str]:
    problems = []
    keep = {p.name for p in work.iterdir()}
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = work / f"out-{path.stem}"
    for argv in (
        ["eval", str(model), "--data", str(path), "--json"],
        ["optimize", str(model), "--data", str(path), "-o", str(out), "--no-latency", "--json", "--passes",
         "fold-batchnorm,prune-channels{ratio=0.3}"],
    ):  # fmt: skip
        code, err = _run(argv, timeout_s)
        problems += _promises(argv, code, err)
    if hashlib.sha256(path.read_bytes()).hexdigest() != before:
        problems.append("the input file changed")
    return problems + _leftovers(work, out, keep)


def check_recipe_file(path: Path, work: Path, *, model: Path = EXAMPLE_MODEL, timeout_s: int = 60) -> list[str]:
    """Run optimize on the example model with the recipe ``path``."""
    with _private_tmpdir(work):
        return _check_recipe(path, work, model, timeout_s)


def _check_recipe(path: Path, work: Path, model: Path, timeout_s: int) -> list[str]:
    keep = {p.name for p in work.iterdir()}
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = work / f"out-{path.stem}"
    argv = ["optimize", str(model), "--recipe", str(path), "-o", str(out), "--no-latency", "--json"]
    code, err = _run(argv, timeout_s)
    problems = _promises(argv, code, err)
    if hashlib.sha256(path.read_bytes()).hexdigest() != before:
        problems.append("the input file changed")
    return problems + _leftovers(work, out, keep)
