"""The binary-weight (1-bit packed) dense and conv kernels against numpy, and their Relax rewrite
end to end against ONNX Runtime on models from ``quantize-binary`` (skipped without the tvm extra)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import apply
from models import ModelBuilder, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.binary import (  # noqa: E402
    SIGN_TABLE,
    binary_conv2d_func,
    binary_dense_func,
    decode_table,
    lanes_for,
    pack_signs,
    split_binary,
)

from graphslim.backend import compile_model, host_cpu_flags, load_artifact  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
needs_avx2 = pytest.mark.skipif("avx2" not in host_cpu_flags(), reason="host cannot run AVX2 code")
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
LANES = [8, pytest.param(16, marks=pytest.mark.skipif("avx512f" not in host_cpu_flags(), reason="host has no AVX-512"))]


def target_for(lanes: int):
    return HOST if lanes == 8 else AVX512


def binary_weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0)
    return (signs * rng.uniform(0.1, 2.0, (n, 1))).astype(np.float32)


def test_split_binary_accepts_only_plus_minus_alpha_rows():
    w = binary_weight(16, 24)
    negative, alpha = split_binary(w)
    np.testing.assert_array_equal(np.where(negative, -1.0, 1.0) * alpha[:, None], w)
    w[3, 5] *= 0.5  # one weight off +-alpha: not a binary layer
    assert split_binary(w) is None
    assert split_binary(np.zeros((8, 8), np.float32)) is None
    z = binary_weight(8, 8)
    z[2] = 0.0  # a zero row (alpha 0) is fine
    negative, alpha = split_binary(z)
    assert alpha[2] == 0 and not negative[2].any()


@pytest.mark.parametrize("lanes", [8, 16])
def test_pack_signs_bit_layout(lanes):
    negative = np.random.default_rng(3).random((4 * lanes, 5)) < 0.5
    bits = pack_signs(negative, 2, lanes)
    assert bits.shape == (2, 5, 2) and bits.dtype == (np.uint8 if lanes == 8 else np.uint16)
    for n in range(4 * lanes):
        tile, g, j = n // (2 * lanes), (n % (2 * lanes)) // lanes, n % lanes
        np.testing.assert_array_equal((bits[tile, :, g] >> j) & 1, negative[n])
    if lanes == 8:
        assert np.array_equal(SIGN_TABLE[bits[0, 0, 0]], np.where(negative[0:8, 0], -1.0, 1.0))


def test_lanes_follow_the_target_vector_width():
    assert lanes_for(HOST, 64) == 8 and lanes_for(AVX512, 64) == 16 and lanes_for(AVX512, 24) == 8
    assert lanes_for(AARCH64, 64) == 8


@needs_avx2
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize(
    "m, k, n, groups, relu",
    [
        (1, 64, 128, 8, False),
        (1, 37, 16, 1, True),
        (3, 48, 32, 2, True),
        (4, 128, 16, 1, False),
        (32, 96, 64, 2, True),
        (6, 16, 192, 4, False),
    ],
)
def test_binary_dense_kernel_matches_numpy(lanes, m, k, n, groups, relu):
    if n % (lanes * groups):
        pytest.skip("outputs not a whole number of tiles")
    w = binary_weight(n, k, seed=m + k)
    negative, alpha = split_binary(w)
    lib = tvm.tirx.build(
        binary_dense_func(m, k, n, groups, relu=relu, lanes=lanes).with_attr("global_symbol", "main"),
        target=target_for(lanes),
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](
        *(tvm.runtime.tensor(a) for a in (x, pack_signs(negative, groups, lanes), decode_table(lanes), alpha, bias)), y
    )
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(y.numpy(), np.maximum(ref, 0) if relu else ref, rtol=1e-4, atol=1e-4)


def conv_reference(x: np.ndarray, w_hwio: np.ndarray, stride: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    kh, kw = w_hwio.shape[:2]
    ho, wo = out_hw
    ref = np.zeros((x.shape[0], ho, wo, w_hwio.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride[0] * (ho - 1) + 1 : stride[0], j : j + stride[1] * (wo - 1) + 1 : stride[1], :]
            ref += np.einsum("nhwc,ck->nhwk", patch.astype(np.float64), w_hwio[i, j].astype(np.float64))
    return ref


@needs_avx2
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize(
    "shape, kernel, stride, k, groups",
    [
        ((1, 10, 10, 3), (3, 3), (1, 1), 16, 1),
        ((2, 9, 11, 8), (3, 3), (2, 2), 16, 1),
        ((1, 6, 6, 12), (1, 1), (1, 1), 48, 1),
        ((1, 8, 8, 16), (5, 5), (1, 1), 32, 2),
    ],
)
def test_binary_conv_kernel_matches_numpy(lanes, shape, kernel, stride, k, groups):
    if lanes == 8:
        groups *= 2
    n, hp, wp, c = shape
    kh, kw = kernel
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    matrix = binary_weight(k, kh * kw * c, seed=c)  # [K, (kh, kw, c)]
    negative, alpha = split_binary(matrix)
    f = binary_conv2d_func(shape, kernel, stride, (ho, wo), k, groups, relu=True, lanes=lanes)
    lib = tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target_for(lanes))
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    bias = np.linspace(-1, 1, k).astype(np.float32)
    y = tvm.runtime.tensor(np.full((n, ho, wo, k), np.nan, np.float32))
    lib["main"](
        *(tvm.runtime.tensor(a) for a in (x, pack_signs(negative, groups, lanes), decode_table(lanes), alpha, bias)), y
    )
    w_hwio = matrix.reshape(k, kh, kw, c).transpose(1, 2, 3, 0)
    ref = np.maximum(conv_reference(x, w_hwio, stride, (ho, wo)) + bias, 0)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_avx512_binary_kernel_decodes_words_with_mask_registers():
    asm = tvm.tirx.build(
        binary_dense_func(4, 64, 64, 2, lanes=16).with_attr("global_symbol", "main"), target=AVX512
    ).inspect_source("asm")
    assert "vptest" in asm and "{%k" in asm and "zmm" in asm, asm[:2000]  # vptest(n)md -> k, masked blend


def test_binary_kernels_compile_for_aarch64_with_neon():
    for func in (binary_dense_func(4, 64, 32, 2), binary_conv2d_func((1, 6, 6, 8), (3, 3), (1, 1), (4, 4), 16, 2)):
        asm = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=AARCH64).inspect_source("asm")
        assert "fmla" in asm, asm[:2000]  # NEON fused multiply-add on the table rows


def binary_cnn(batch: int = 2):
    b = ModelBuilder("bcnn", (batch, 8, 12, 12), 0)
    x = b.relu(b.conv("input", 16, k=3))
    x = b.relu(b.conv(x, 32, k=3))
    x = b.relu(b.conv(x, 32, k=3, stride=2))
    x = b.add(b.conv(x, 32, k=1, pad=0), x)  # 1x1 conv in a residual add
    x = b.relu(b.gemm(b.flatten(x), 64))
    x = b.relu(b.bias_add(b.matmul(x, 24)))
    return b.build(b.gemm(x, 10))


@needs_avx2
def test_binary_rewrite_uses_the_kernels_and_matches_onnx_runtime(tmp_path):
    """``quantize-binary`` (first and last layers kept) on convs, a Gemm and a MatMul: every
    binarized layer runs on a binary kernel (bias and ReLU fused), the rest stay dense, and the
    outputs match ORT on the same binarized model within 1e-4."""
    model, results = apply(binary_cnn(), "quantize-binary{op_types=[Conv,Gemm,MatMul]}")
    binarized = results[0].stats["binarized"]
    assert binarized == 5
    art = compile_model(model, "x86", tmp_path / "a", batch=2)
    assert art.meta["rewrites"] == ["binary"]
    kernels = art.meta["kernel_schedules"]
    used = {name: how for name, how in kernels.items() if how in ("kernel:binary_dense", "kernel:binary_conv2d")}
    assert sorted(used.values()).count("kernel:binary_conv2d") == 3, kernels
    assert sorted(used.values()).count("kernel:binary_dense") == 2, kernels
    assert sum(name.endswith("_relu") for name in used) == 4, kernels  # conv, conv, Gemm, MatMul+bias
    feeds = sample_inputs(model, 2)
    got = load_artifact(art.folder)(feeds)[0]
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_unbinarized_and_odd_layers_stay_dense(tmp_path):
    """The same network without the pass, and a binary layer with 10 outputs (no whole byte of
    output lanes), compile on the dense path."""
    art = compile_model(binary_cnn(), "x86", tmp_path / "a", batch=2)
    assert "binary" not in art.meta["rewrites"]
    head = [n.name for n in binary_cnn().graph.node if n.op_type == "Gemm"][-1]
    model, results = apply(binary_cnn(), f"quantize-binary{{layers=[{head}]}}")
    assert results[0].stats["binarized"] == 1
    art = compile_model(model, "x86", tmp_path / "b", batch=2)
    assert "binary" not in art.meta["rewrites"]
    feeds = sample_inputs(model, 2)
    np.testing.assert_allclose(load_artifact(art.folder)(feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)
