"""The block-sparse (BSR) dense kernel against numpy, and its Relax rewrite end to end against
ONNX Runtime (skipped without the tvm extra)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import apply
from models import ModelBuilder, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.sparse import CONV_BLOCKS, bsr_dense_func, choose_block, to_bsr  # noqa: E402

from graphslim.backend import compile_model, host_cpu_flags, load_artifact  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
needs_avx2 = pytest.mark.skipif("avx2" not in host_cpu_flags(), reason="host cannot run AVX2 code")


def block_sparse(n: int, k: int, block: tuple[int, int], sparsity: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random((n // block[0], k // block[1])) >= sparsity
    mask = np.repeat(np.repeat(keep, block[0], 0), block[1], 1)
    return (rng.standard_normal((n, k)) * mask).astype(np.float32)


@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_to_bsr_round_trips(block, sparsity):
    w = block_sparse(32, 48, block, sparsity)
    data, indices, indptr = to_bsr(w, block)
    br, bc = block
    dense = np.zeros_like(w)
    for row in range(len(indptr) - 1):
        for p in range(indptr[row], indptr[row + 1]):
            dense[row * br : (row + 1) * br, indices[p] * bc : (indices[p] + 1) * bc] = data[p].T
    np.testing.assert_array_equal(dense, w)
    assert len(indices) == int(np.count_nonzero(np.abs(w).reshape(32 // br, br, 48 // bc, bc).max(axis=(1, 3))))


@needs_avx2
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
@pytest.mark.parametrize(
    "m, k, n, sparsity, relu",
    [
        (1, 64, 32, 0.9, False),
        (3, 48, 64, 0.5, True),
        (8, 128, 48, 0.0, False),
        (32, 64, 64, 0.95, True),
        (6, 32, 16, 1.0, False),
    ],
)
def test_bsr_kernel_matches_numpy(block, m, k, n, sparsity, relu):
    w = block_sparse(n, k, block, sparsity, seed=m + k)
    data, indices, indptr = to_bsr(w, block)
    if len(indices) == 0:  # the rewrite stores one zero block for an all-zero weight; so do we
        data, indices = np.zeros((1, block[1], block[0]), np.float32), np.zeros(1, np.int32)
    func = bsr_dense_func(m, k, n, block, len(indices), relu=relu)
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=HOST)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, data, indices, indptr, bias)), y)
    ref = x @ w.T + bias
    np.testing.assert_allclose(y.numpy(), np.maximum(ref, 0) if relu else ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
def test_bsr_kernel_compiles_for_aarch64_with_neon(block):
    w = block_sparse(32, 64, block, 0.8)
    _, indices, _ = to_bsr(w, block)
    lib = tvm.tirx.build(
        bsr_dense_func(4, 64, 32, block, len(indices)).with_attr("global_symbol", "main"), target=AARCH64
    )
    asm = lib.inspect_source("asm")
    assert "fmla" in asm or "fmul" in asm  # NEON / AArch64 floating-point code


def test_block_choice_takes_the_cheapest_blocking_that_reaches_the_threshold():
    assert choose_block(block_sparse(64, 64, (16, 1), 0.9))[0] == (16, 1)
    assert choose_block(block_sparse(64, 64, (4, 4), 0.9))[0] == (4, 4)
    # 1x4 zeros also leave ~0.95^4 of the 4x4 blocks empty; 1x4 stores 4x fewer weights
    assert choose_block(block_sparse(64, 64, (1, 4), 0.95))[0] == (1, 4)
    assert choose_block(block_sparse(64, 64, (16, 1), 0.3)) is None  # below the 0.6 default
    assert choose_block(block_sparse(60, 64, (4, 4), 0.9), 0.6)[0] == (4, 4)  # 60 rows: no 16x1 tiling
    # a product over whole vectors of rows runs 1x4 blocks vectorized over the rows, faster than 4x4
    assert choose_block(block_sparse(64, 64, (4, 4), 0.9), rows_vectorized=True)[0] == (1, 4)


def mlp(batch: int = 4):
    b = ModelBuilder("mlp", (batch, 64), 0)
    x = b.relu(b.gemm("input", 128))
    x = b.relu(b.bias_add(b.matmul(x, 96)))
    return b.build(b.gemm(x, 10))


@needs_avx2
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
def test_rewrite_uses_the_kernel_on_sparsified_layers_and_matches_onnx_runtime(block, tmp_path):
    model, _ = apply(mlp(), f"sparsify-blocks{{sparsity=0.95,block=[{block[0]},{block[1]}]}}")
    art = compile_model(model, "x86", tmp_path / "a", batch=4)
    assert art.meta["rewrites"] == ["bsr-dense"]
    kernels = art.meta["kernel_schedules"]
    used = [name for name, how in kernels.items() if how == "kernel:bsr_dense"]
    # the two big layers (64->128, 128->96) use the blocking they were sparsified with; the
    # 96->10 head (10 outputs: no 16x1 tiling) may take another one or stay dense
    assert sum(name.startswith(f"bsr_dense_{block[0]}x{block[1]}") for name in used) >= 2, kernels
    feeds = sample_inputs(model, 4)
    got = load_artifact(art.folder)(feeds)[0]
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_dense_layers_stay_on_the_dense_path(tmp_path):
    model, _ = apply(mlp(), "sparsify-blocks{sparsity=0.4,block=[16,1]}")  # below the threshold
    art = compile_model(model, "x86", tmp_path / "a", batch=4)
    assert "bsr-dense" not in art.meta["rewrites"]  # (the fp32 layers take the packed dense path)
    assert "kernel:bsr_dense" not in art.meta["kernel_schedules"].values()


def cnn(batch: int = 2):
    b = ModelBuilder("cnn", (batch, 8, 12, 12), 0)
    x = b.relu(b.conv("input", 32, k=3))
    x = b.relu(b.conv(x, 32, k=3, stride=2))
    x = b.add(b.conv(x, 32, k=1, pad=0), x)  # 1x1 conv in a residual add
    return b.build(b.gemm(b.flatten(x), 10))


@needs_avx2
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
def test_sparse_conv_rewrite_matches_onnx_runtime(block, tmp_path):
    """3x3 (padded, strided) and 1x1 convolutions with 16x1 block-sparse weights run on the BSR
    conv kernel in NHWC, with no transposes left between them and bias + ReLU fused into the
    kernel (the ``_relu`` variants); no conv takes 4x4 or 1x4 blocks; all match ORT within 1e-4."""
    model, _ = apply(cnn(), f"sparsify-blocks{{sparsity=0.9,block=[{block[0]},{block[1]}]}}")
    art = compile_model(model, "x86", tmp_path / "a", batch=2)
    kernels = art.meta["kernel_schedules"]
    convs = [name for name, how in kernels.items() if how == "kernel:bsr_conv2d"]
    if block not in CONV_BLOCKS:  # measured slower than dense: 16x1 blocks if the zeros allow, or dense
        assert all(name.startswith("bsr_conv2d_16x1") for name in convs), kernels
    else:
        assert len(convs) == 3 and sum(name.endswith("_relu") for name in convs) == 2, kernels
    assert not any(name.startswith(("fused_relu", "fused_add_relu", "relu")) for name in kernels), kernels
    transposes = [name for name in kernels if "transpose" in name]
    assert len(transposes) <= 2, kernels  # the model's input (NCHW -> NHWC) and the Flatten before Gemm
    feeds = sample_inputs(model, 2)
    got = load_artifact(art.folder)(feeds)[0]
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-4, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize(
    "shape, kernel, stride, k, block",
    [
        ((1, 10, 10, 3), (3, 3), (1, 1), 16, (16, 1)),
        ((2, 9, 11, 8), (3, 3), (2, 2), 8, (4, 4)),
        ((1, 6, 6, 12), (1, 1), (1, 1), 4, (1, 4)),
        ((1, 8, 8, 16), (5, 5), (1, 1), 32, (16, 1)),
    ],
)
def test_bsr_conv_kernel_matches_numpy(shape, kernel, stride, k, block):
    from graphslim.kernels.sparse import bsr_conv2d_func, conv_offsets

    n, hp, wp, c = shape
    kh, kw = kernel
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    w = block_sparse(k, c * kh * kw, block, 0.7, seed=c)  # [K, C*KH*KW], ONNX column order
    data, indices, indptr = to_bsr(w, block)
    f = bsr_conv2d_func(shape, kernel, stride, (ho, wo), k, block, len(indices))
    lib = tvm.tirx.build(f.with_attr("global_symbol", "main"), target=HOST)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y = tvm.runtime.tensor(np.full((n, ho, wo, k), np.nan, np.float32))
    offsets = conv_offsets(indices, block, shape, kernel)
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, data, offsets, indptr, np.zeros(k, np.float32))), y)
    w4 = w.reshape(k, c, kh, kw)
    ref = np.zeros((n, ho, wo, k), np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride[0] * (ho - 1) + 1 : stride[0], j : j + stride[1] * (wo - 1) + 1 : stride[1], :]
            ref += np.einsum("nhwc,kc->nhwk", patch, w4[:, :, i, j])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_cancel_transposes_removes_inverse_pairs_only():
    from graphslim.kernels.pipeline import cancel_transposes
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 3, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            b = bb.emit(relax.op.permute_dims(a, [0, 3, 1, 2]))  # inverse of a: cancels
            c = bb.emit(relax.op.permute_dims(b, [0, 2, 3, 1]))
            d = bb.emit(relax.op.permute_dims(c, [0, 2, 3, 1]))  # not an inverse: stays
            out = bb.emit_output(relax.op.nn.relu(d))
        bb.emit_func_output(out)
    mod = relax.transform.DeadCodeElimination()(cancel_transposes(bb.get()))
    text = mod["main"].script()
    assert text.count("R.permute_dims") == 2, text


def test_sink_transposes_moves_through_qdq_and_adds_and_cancels_pairs():
    """A transpose to NCHW followed by a bias add, QDQ, ReLU and max pooling, then a transpose back
    to NHWC (what ConvertLayout leaves between two NHWC convs of a QDQ model): after sinking, the
    pair cancels, per-channel axes are remapped, the broadcast bias is permuted, the pooling runs
    in NHWC, and the numbers are the same."""
    from graphslim.kernels.pipeline import cancel_transposes, sink_transposes
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 8), "float32"))
    bias = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1)
    scale = np.linspace(0.05, 0.1, 8).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))  # NHWC -> NCHW
            a = bb.emit(relax.op.add(a, relax.const(bias)))
            q = bb.emit(relax.op.quantize(a, relax.const(scale), relax.const(np.zeros(8, np.int8)), 1, "int8"))
            d = bb.emit(relax.op.dequantize(q, relax.const(scale), relax.const(np.zeros(8, np.int8)), 1, "float32"))
            r = bb.emit(relax.op.nn.relu(d))
            r = bb.emit(relax.op.nn.max_pool2d(r, [2, 2], [2, 2], [0, 1, 0, 1]))  # NCHW pooling, padded
            out = bb.emit_output(relax.op.permute_dims(r, [0, 2, 3, 1]))  # back to NHWC
        bb.emit_func_output(out)
    before = bb.get()
    after = relax.transform.DeadCodeElimination()(cancel_transposes(sink_transposes(before)))
    text = after["main"].script()
    assert text.count("R.permute_dims") <= 1 and 'layout="NHWC"' in text, text  # only the bias's permute
    data = np.random.default_rng(0).standard_normal((1, 4, 5, 8)).astype(np.float32) * 3

    def run_mod(mod):
        ex = tvm.compile(mod, HOST)
        return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()

    np.testing.assert_array_equal(run_mod(after), run_mod(before))
