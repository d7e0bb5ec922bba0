"""The fused attention kernel against numpy (masks broadcast every way, scale, vector widths 4, 8
and 16), and the ``attention`` rewrite on decomposed attention against ONNX Runtime: with a padding
mask, without one, scaled by Div, and a causal mask by Where, which stays on the unfused kernels
(skipped without the tvm extra or on a host without AVX2)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.attention import attention_func  # noqa: E402

from graphslim.backend import compile_model, host_cpu_flags, load_artifact  # noqa: E402

pytestmark = pytest.mark.skipif("avx2" not in host_cpu_flags(), reason="host cannot run AVX2 code")
HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def _reference(q, kt, v, mask, scale):
    x = (q.astype(np.float64) @ kt) * scale + mask
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize(
    "shape, mask_shape, lanes",
    [
        ((1, 2, 8, 16, 8, 8), (1, 1, 1, 16), 8),  # padding mask over keys
        ((2, 3, 6, 24, 5, 16), (2, 1, 1, 24), 8),  # odd head size, a mask per batch, 3 rows a block
        ((1, 4, 16, 32, 32, 32), (1, 1, 16, 32), 8),  # a mask per query (causal as a bias)
        ((2, 2, 4, 8, 4, 8), (2, 2, 4, 8), 4),  # full mask, NEON / SSE width
        ((1, 2, 4, 32, 16, 64), (1, 1, 1, 32), 16),  # AVX-512 width (two AVX2 halves here), 1 row
        ((1, 1, 3, 8, 8, 8), (1, 1, 1, 8), 8),  # S not a multiple of 2: one row a block
        ((1, 2, 17, 17, 8, 8), (1, 1, 1, 17), 8),  # ViT-like: T = patches + 1, a one-key tail
        ((2, 1, 4, 5, 4, 8), (2, 1, 1, 5), 8),  # T shorter than a vector: all tail
        ((1, 2, 6, 29, 16, 16), (1, 1, 6, 29), 8),  # a 5-key tail with a mask per query
    ],
)
def test_attention_kernel_matches_numpy(shape, mask_shape, lanes):
    b, h, s, t, d, dv = shape
    rng = np.random.default_rng(sum(shape))
    q, kt, v = (rng.standard_normal(x).astype(np.float32) for x in ((b, h, s, d), (b, h, d, t), (b, h, t, dv)))
    mask = np.where(rng.random(mask_shape) < 0.3, -3.4028234663852886e38, 0.0).astype(np.float32)
    mask[..., 0] = 0.0  # every row keeps one key (a fully masked row is uniform, as in ORT)
    mask += rng.standard_normal(mask_shape).astype(np.float32) * (mask == 0)  # and a bias
    scale = 1 / np.sqrt(d)
    y = tvm.runtime.tensor(np.full((b, h, s, dv), np.nan, np.float32))
    lib = tvm.tirx.build(
        attention_func(shape, mask_shape, scale, lanes).with_attr("global_symbol", "main"), target=HOST
    )
    lib["main"](*(tvm.runtime.tensor(a) for a in (q, kt, v, mask)), y)
    np.testing.assert_allclose(y.numpy(), _reference(q, kt, v, mask, scale), rtol=2e-5, atol=2e-6)


def _attention_model(mask: str | None, scale_op: str = "Mul", heads: int = 2, seq: int = 16, dim: int = 8):
    """Decomposed attention over [B, S, H*D] inputs: per-head reshape / transpose, Q K^T, a scale
    by ``scale_op``, then ``mask``: "padding" (Add of a [B, 1, 1, S] bias from a 0/1 mask input),
    "causal" (Where on a constant lower-triangular mask) or None, Softmax, P V."""
    hd = heads * dim
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("heads_shape", np.array([0, 0, heads, dim], np.int64))
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes.append(helper.make_node("Reshape", [n, "heads_shape"], [f"{n}4"]))
        nodes.append(helper.make_node("Transpose", [f"{n}4"], [f"{n}h"], perm=perm))
    nodes.append(helper.make_node("MatMul", ["qh", "kh"], ["scores"]))
    scale = const("scale", np.float32(1 / np.sqrt(dim) if scale_op == "Mul" else np.sqrt(dim)))
    nodes.append(helper.make_node(scale_op, ["scores", scale], ["scaled"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", seq, hd]) for n in "qkv"]
    logits = "scaled"
    if mask == "padding":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", seq]))
        const("axes", np.array([1, 2], np.int64))
        nodes += [
            helper.make_node("Unsqueeze", ["mask", "axes"], ["mask4"]),
            helper.make_node("Sub", [const("one", np.float32(1)), "mask4"], ["inv"]),
            helper.make_node("Mul", ["inv", const("big", np.float32(-10000.0))], ["bias"]),
            helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        ]
        logits = "masked"
    elif mask == "causal":
        const("tri", np.tril(np.ones((seq, seq), bool)))
        nodes.append(helper.make_node("Where", ["tri", "scaled", const("neg", np.float32(-1e9))], ["masked"]))
        logits = "masked"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", const("out_shape", np.array([0, 0, hd], np.int64))], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", seq, hd])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize(
    "mask, scale_op, seq, fused",
    [("padding", "Mul", 16, True), (None, "Div", 16, True), (None, "Div", 13, True), ("causal", "Mul", 16, False)],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_decomposed_attention_runs_on_the_fused_kernel_and_matches_onnx_runtime(
    mask, scale_op, seq, fused, batch, tmp_path
):
    """Fused (BERT-style padding mask; no mask with a Div scale as ViT exports it, at a sequence
    that is not a whole number of vectors) or left to the three kernels (causal Where)."""
    import onnxruntime as ort

    model = _attention_model(mask, scale_op, seq=seq)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(batch)
    feeds = {n: rng.standard_normal((batch, seq, 16)).astype(np.float32) for n in "qkv"}
    if mask == "padding":
        feeds["mask"] = np.ones((batch, seq), np.float32)
        feeds["mask"][-1, 11:] = 0  # the last sample padded
    art = compile_model(model, "x86", tmp_path / "a", shapes={k: list(v.shape) for k, v in feeds.items()})
    assert ("attention" in art.meta["rewrites"]) is fused
    assert ("kernel:attention" in art.meta["kernel_schedules"].values()) is fused
    got = load_artifact(art.folder)(feeds)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
