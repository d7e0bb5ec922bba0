"""The row kernels (softmax, LayerNorm, max / min / sum over the last axis) against numpy on every
vector width the backend uses (4: NEON / SSE, 8: AVX2, 16: AVX-512, run here as two AVX2
halves), and the ``row-kernels`` rewrite end to end against ONNX Runtime (skipped without the
tvm extra or on a host without AVX2)."""

from __future__ import annotations

import numpy as np
import pytest
from models import ModelBuilder, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.rows import layer_norm_func, reduce_rows_func, softmax_func  # noqa: E402

from graphslim.backend import compile_model, host_cpu_flags, load_artifact  # noqa: E402

pytestmark = pytest.mark.skipif("avx2" not in host_cpu_flags(), reason="host cannot run AVX2 code")
HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})

# (rows, cols, lanes): one vector per row, a row of 1, 2 and 4 accumulators' worth, odd rows
SHAPES = [
    (3, 4, 4),
    (5, 8, 8),
    (7, 24, 8),
    (4, 64, 8),
    (9, 128, 8),
    (2, 1024, 8),
    (3, 48, 16),
    (6, 256, 16),
    (1, 36, 4),
]


def _build(func):
    return tvm.tirx.build(func.with_attr("global_symbol", "main"), target=HOST)["main"]


def _data(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
    x[0, cols // 2] = 30.0  # one large entry: the max must be found wherever it sits
    x[-1, -1] = -50.0
    return x


@pytest.mark.parametrize("rows, cols, lanes", SHAPES)
def test_softmax_rows_match_numpy(rows, cols, lanes):
    x = _data(rows, cols, rows + cols)
    y = tvm.runtime.tensor(np.full((rows, cols), np.nan, np.float32))
    _build(softmax_func(rows, cols, lanes))(tvm.runtime.tensor(x), y)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y.numpy(), e / e.sum(axis=1, keepdims=True), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("rows, cols, lanes", SHAPES)
def test_layer_norm_rows_match_numpy(rows, cols, lanes):
    rng = np.random.default_rng(cols)
    x = _data(rows, cols, rows * cols) + 100.0  # a large mean: the two-pass variance stays exact
    gamma, beta = rng.standard_normal(cols).astype(np.float32), rng.standard_normal(cols).astype(np.float32)
    y = tvm.runtime.tensor(np.full((rows, cols), np.nan, np.float32))
    _build(layer_norm_func(rows, cols, lanes, 1e-5))(*(tvm.runtime.tensor(a) for a in (x, gamma, beta)), y)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("op", ["max", "min", "sum"])
@pytest.mark.parametrize("rows, cols, lanes", SHAPES)
def test_reductions_over_rows_match_numpy(op, rows, cols, lanes):
    x = _data(rows, cols, 7 * rows + cols)
    y = tvm.runtime.tensor(np.full(rows, np.nan, np.float32))
    _build(reduce_rows_func(rows, cols, lanes, op))(tvm.runtime.tensor(x), y)
    ref = getattr(x.astype(np.float64), op)(axis=1)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6, atol=1e-4 if op == "sum" else 0)


def test_softmax_layer_norm_and_reductions_in_a_model_run_on_the_row_kernels(tmp_path):
    shape = (4, 6, 32)
    b = ModelBuilder("rows", shape, 0, opset=17)
    x = b.node("Softmax", ["input"], shape, axis=-1)
    gamma, beta = (b.const(np.linspace(lo, hi, 32).astype(np.float32)) for lo, hi in ((0.5, 1.5), (-1, 1)))
    ln = b.node("LayerNormalization", [x, gamma, beta], shape, axis=-1)
    model = b.build(b.add(ln, b.node("ReduceMax", ["input"], (4, 6, 1), axes=[-1], keepdims=1)))
    art = compile_model(model, "x86", tmp_path / "a", batch=4)
    assert "row-kernels" in art.meta["rewrites"]
    kernels = set(art.meta["kernel_schedules"].values())
    assert {"kernel:softmax", "kernel:layer_norm", "kernel:reduce_max"} <= kernels, kernels
    feeds = sample_inputs(model, 4)
    np.testing.assert_allclose(load_artifact(art.folder)(feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
