"""Mutated ONNX files for robustness testing, and the checks a run over them must pass.

``mutants(seed_models, n, seed)`` yields (name, bytes) pairs: truncations, bit flips, and edits of
the parsed protobuf (wrong op types, missing inputs and initializers, cycles, bad and huge dims,
wrong dtypes, opsets out of range, external data that points outside the model folder, duplicate
names, empty graphs). ``check_file`` runs ``graphslim inspect`` and ``graphslim optimize`` on one
file in this process and reports every broken promise: an internal error (exit 1) instead of a
clear input error, a changed input file, a half-written output folder, a leftover temporary.
The big run is ``benchmarks/fuzz.py``; tests keep a small fixed-seed corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

__all__ = ["check_file", "mutants"]

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


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def check_file(path: Path, work: Path, *, timeout_s: int = 60) -> list[str]:
    """Run inspect and optimize on ``path``; return the broken promises (empty: all kept)."""
    from graphslim.cli import main

    problems = []
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
        err = buf_err.getvalue()
        if code not in (0, 2, 3):
            problems.append(f"{argv[0]}: exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        if "Traceback" in err:
            problems.append(f"{argv[0]}: traceback on stderr")
    if hashlib.sha256(path.read_bytes()).hexdigest() != before:
        problems.append("the input file changed")
    if out.exists() and not ((out / "model.onnx").is_file() and (out / "report.json").is_file()):
        problems.append("half-written output folder")
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(f".out-{path.stem}.")]
    if leftovers:
        problems.append(f"temporary left behind: {leftovers}")
    return problems
