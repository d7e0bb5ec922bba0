"""Writes the hostile inputs of issue 18 into tests/corpus/ (run once; the files are committed).

- ``constant_of_shape_bomb.onnx``: ConstantOfShape of 1100 x 1,000,000 floats (4.4 GB) into a
  ReduceSum: folding it, or running it, takes 4.4 GB.
- ``no_parameters.onnx``: Relu and Identity only (r = params after / before is undefined).
- ``fixed_batch.onnx``: a small MLP whose batch dimension is fixed at 1.
- ``zip_bomb.npz``: one deflate member (what np.savez_compressed writes) that expands to 4 GiB
  of float32 zeros (4 MB on disk, a few KB in git).
- ``bzip2_bomb.npz``: the same with bzip2, which zipfile decompresses without a size limit
  (3 KB on disk).
- ``alias_bomb.yaml``: a YAML recipe whose aliases describe 10^9 values.
- ``deep.json``, ``deep.yaml``: recipes nested 5,000 levels deep.
- ``huge_int.json``: a recipe option with a 4,000-digit integer.
- ``not_utf8.json``: a recipe in Latin-1.

    python tests/corpus/make_hostile.py
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    m = helper.make_model(
        helper.make_graph(nodes, "hostile", inputs, outputs, list(inits)), opset_imports=[helper.make_opsetid("", 13)]
    )
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def models() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1100, 1_000_000])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    bomb = _model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], name="big", value=one),
            helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"], name="add"),
        ],
        [x],
        [y],
        [shape],
    )
    onnx.save(bomb, HERE / "constant_of_shape_bomb.onnx")
    bare = _model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Identity", ["r"], ["y"], name="id")],
        [x],
        [y],
    )
    onnx.save(bare, HERE / "no_parameters.onnx")
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")
    fixed = _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w1, w2],
    )
    onnx.save(fixed, HERE / "fixed_batch.onnx")


def zip_bomb(path: Path, gib: int = 4, method: int = zipfile.ZIP_DEFLATED) -> None:
    """A real bomb: the member decompresses to ``gib`` GiB of zeros (about 1000:1 with deflate;
    bzip2 turns runs of zeros into almost nothing). Each takes a minute to write."""
    n = gib * 2**30 // 4
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
    header = buf.getvalue()  # the magic and header np.save writes
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        with zf.open("input.npy", "w", force_zip64=True) as f:
            f.write(header)
            zeros = bytes(64 * 2**20)
            for _ in range(gib * 16):
                f.write(zeros)


def recipes() -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
        prev = name
    lines.append(f"passes:\n  - name: prune-channels\n    options:\n      exclude: *{prev}")
    (HERE / "alias_bomb.yaml").write_text("\n".join(lines) + "\n")
    (HERE / "deep.json").write_text("[" * 5_000 + "]" * 5_000)
    (HERE / "deep.yaml").write_text("passes: " + "[" * 5_000 + "]" * 5_000 + "\n")
    (HERE / "huge_int.json").write_text('[{"name": "prune-channels", "options": {"round_to": ' + "9" * 4000 + "}}]")
    (HERE / "not_utf8.json").write_bytes('[{"name": "fold-constants"}, "r\u00e9sum\u00e9"]'.encode("latin-1"))


if __name__ == "__main__":
    models()
    recipes()
    zip_bomb(HERE / "zip_bomb.npz")
    zip_bomb(HERE / "bzip2_bomb.npz", method=zipfile.ZIP_BZIP2)
