"""The block-sparse (BSR) dense kernel against numpy, and its Relax rewrite end to end against
ONNX Runtime (skipped without the tvm extra)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import apply
from models import ModelBuilder, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.sparse import bsr_dense_func, choose_block, to_bsr  # noqa: E402

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
            dense[row * br:(row + 1) * br, indices[p] * bc:(indices[p] + 1) * bc] = data[p].T
    np.testing.assert_array_equal(dense, w)
    assert len(indices) == int(np.count_nonzero(np.abs(w).reshape(32 // br, br, 48 // bc, bc).max(axis=(1, 3))))


@needs_avx2
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
@pytest.mark.parametrize("m, k, n, sparsity", [(1, 64, 32, 0.9), (3, 48, 64, 0.5), (8, 128, 48, 0.0),
                                               (32, 64, 64, 0.95), (6, 32, 16, 1.0)])
def test_bsr_kernel_matches_numpy(block, m, k, n, sparsity):
    w = block_sparse(n, k, block, sparsity, seed=m + k)
    data, indices, indptr = to_bsr(w, block)
    if len(indices) == 0:  # the rewrite stores one zero block for an all-zero weight; so do we
        data, indices = np.zeros((1, block[1], block[0]), np.float32), np.zeros(1, np.int32)
    lib = tvm.tirx.build(bsr_dense_func(m, k, n, block, len(indices)).with_attr("global_symbol", "main"), target=HOST)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, data, indices, indptr)), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4)])
def test_bsr_kernel_compiles_for_aarch64_with_neon(block):
    w = block_sparse(32, 64, block, 0.8)
    _, indices, _ = to_bsr(w, block)
    lib = tvm.tirx.build(bsr_dense_func(4, 64, 32, block, len(indices)).with_attr("global_symbol", "main"),
                         target=AARCH64)
    asm = lib.inspect_source("asm")
    assert "fmla" in asm or "fmul" in asm  # NEON / AArch64 floating-point code


def test_block_choice_takes_the_cheapest_blocking_that_reaches_the_threshold():
    assert choose_block(block_sparse(64, 64, (16, 1), 0.9))[0] == (16, 1)
    assert choose_block(block_sparse(64, 64, (4, 4), 0.9))[0] == (4, 4)
    # 1x4 zeros also leave ~0.95^4 of the 4x4 blocks empty; 1x4 stores 4x fewer weights
    assert choose_block(block_sparse(64, 64, (1, 4), 0.95))[0] == (1, 4)
    assert choose_block(block_sparse(64, 64, (16, 1), 0.3)) is None  # below the 0.6 default
    assert choose_block(block_sparse(60, 64, (4, 4), 0.9), 0.6)[0] == (4, 4)  # 60 rows: no 16x1 tiling


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
    assert art.meta["rewrites"] == []
    assert "kernel:bsr_dense" not in art.meta["kernel_schedules"].values()
