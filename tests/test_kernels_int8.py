"""The int8 dense and conv kernels (AVX2 vpmaddwd and vpmaddubsw, VNNI, AArch64 sdot) against numpy, and the QDQ rewrite end to end against
ONNX Runtime (skipped without the tvm extra or on a host without AVX2)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import apply, run_aarch64
from models import ModelBuilder, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

import tvm  # noqa: E402
from graphslim.kernels.int8 import (  # noqa: E402
    AVX2,
    AVX2_U8S8,
    NEON_DOT,
    conv_tile,
    dense_tile,
    has_vnni,
    isa_for,
    isa_for_weights,
    pack_conv_weights,
    pack_weights,
    qconv2d_func,
    qdense_func,
)
from graphslim.kernels.int8 import VNNI as VNNI_ISA  # noqa: E402

from graphslim.backend import compile_model, host_cpu_flags, load_artifact  # noqa: E402
from graphslim.core.data import Dataset  # noqa: E402

pytestmark = pytest.mark.skipif("avx2" not in host_cpu_flags(), reason="host cannot run AVX2 code")
HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
needs_vnni = pytest.mark.skipif("avx512_vnni" not in host_cpu_flags(), reason="host has no AVX-512 VNNI")


SHAPES = [(1, 64, 16), (3, 130, 48), (8, 256, 32), (32, 64, 64), (5, 7, 64), (2, 1030, 128)]  # odd K: padded


def _isa(name: str):
    return {
        "vnni": (VNNI_ISA, VNNI, "vpdpbusd"),
        "avx2": (AVX2, HOST, "vpmaddwd"),
        "avx2u8s8": (AVX2_U8S8, HOST, "vpmaddubsw"),
    }[name]


def _weights(rng, shape, isa):
    """int8 weights over the range the instruction set sums exactly: the full int8 range (-128
    included), or +-64 for the saturating AVX2 byte path (where +-65 could saturate)."""
    if isa is AVX2_U8S8:
        return rng.integers(-64, 65, shape).astype(np.int8)
    return rng.integers(-128, 128, shape).astype(np.int8)


@pytest.mark.parametrize("qdtype", ["uint8", "int8"])
@pytest.mark.parametrize("isa_name", ["avx2", "avx2u8s8", pytest.param("vnni", marks=needs_vnni)])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_int8_kernel_is_exact_against_numpy(isa_name, qdtype, m, k, n):
    isa, target, insn = _isa(isa_name)
    rng = np.random.default_rng(m + k + n)
    info = np.iinfo(qdtype)
    q = rng.integers(info.min, info.max + 1, (m, k)).astype(qdtype)
    w = _weights(rng, (n, k), isa)
    if isa is AVX2_U8S8:  # the worst case: every byte product at its extreme, in every pair
        q[0], w[0] = info.max, -64
    scale = rng.uniform(0.001, 0.1, n).astype(np.float32)
    offset = rng.standard_normal(n).astype(np.float32)
    # exact integer reference, relative to the zero point the kernel uses (int8 read as uint8 q + 128
    # on VNNI; the rewrite moves the zero point to match)
    acc = (q.astype(np.int64) + (isa.zero_point(0, qdtype))) @ w.T.astype(np.int64)
    _, lanes, g = dense_tile(m, n, isa)
    lib = tvm.tirx.build(qdense_func(m, k, n, qdtype, isa).with_attr("global_symbol", "main"), target=target)
    assert insn in lib.inspect_source("asm")
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    bias = rng.standard_normal(n).astype(np.float32)
    lib["main"](*(tvm.runtime.tensor(a) for a in (q, pack_weights(w, lanes * g, isa), scale, offset, bias)), y)
    np.testing.assert_allclose(
        y.numpy(), (acc * scale.astype(np.float64) + offset + bias).astype(np.float32), rtol=1e-6, atol=1e-5
    )


ARM_DOT = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})


def test_int8_kernels_compile_to_the_aarch64_dot_product():
    for func in (
        qdense_func(4, 64, 32, "uint8", NEON_DOT),
        qconv2d_func((1, 8, 6, 6), (3, 3), (1, 1), (1, 1, 1, 1), 16, 3, "uint8", NEON_DOT),
    ):
        asm = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=ARM_DOT).inspect_source("asm")
        assert "sdot" in asm, asm[:2000]


def test_vnni_is_detected_from_the_target_cpu():
    assert has_vnni(VNNI) and has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"}))
    assert not has_vnni(HOST)
    assert not has_vnni(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))
    assert isa_for(VNNI) is VNNI_ISA and isa_for(HOST) is AVX2 and isa_for(ARM_DOT) is NEON_DOT
    assert isa_for(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) is None


def test_avx2_takes_the_byte_path_only_for_weights_it_sums_exactly():
    """vpmaddubsw sums two uint8 x int8 products in saturating int16: exact while |w| <= 64
    (255 * 64 * 2 = 32640); a single weight of 65 (or -65) keeps the layer on vpmaddwd."""
    w = np.full((16, 8), 64, np.int8)
    assert isa_for_weights(AVX2, w) is AVX2_U8S8 and isa_for_weights(AVX2, -w) is AVX2_U8S8
    for bad in (65, -65, 127, -128):
        w[3, 5] = bad
        assert isa_for_weights(AVX2, w) is AVX2
    assert isa_for_weights(VNNI_ISA, w) is VNNI_ISA and isa_for_weights(NEON_DOT, w) is NEON_DOT
    # past the bound the byte path really saturates: the check is what keeps results exact
    q = np.full((1, 2), 255, np.uint8)
    wb = np.full((16, 2), 127, np.int8)
    lib = tvm.tirx.build(qdense_func(1, 2, 16, "uint8", AVX2_U8S8).with_attr("global_symbol", "main"), target=HOST)
    y = tvm.runtime.tensor(np.zeros((1, 16), np.float32))
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
    lib["main"](*(tvm.runtime.tensor(a) for a in (q, pack_weights(wb, 16, AVX2_U8S8), ones, zeros, zeros)), y)
    assert y.numpy()[0, 0] == 32767 and 255 * 127 * 2 != 32767


def qdq_mlp(batch: int = 4):
    b = ModelBuilder("mlp", (batch, 64), 0)
    x = b.relu(b.gemm("input", 128))  # Gemm (transB): W [N, K], per-channel on axis 0
    x = b.relu(b.bias_add(b.matmul(x, 96)))  # MatMul: W [K, N], per-channel on axis 1
    model = b.build(b.gemm(x, 10))  # 10 outputs: not a multiple of 16, stays on the float path
    data = Dataset({"input": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)})
    qmodel, _ = apply(model, "quantize-int8", data=data)
    return qmodel


def _flavor(target: str) -> str:
    """The int8 kernels a target gets on this host: "_vnni" names with AVX-512 VNNI."""
    return "_vnni" if target == "x86" and "avx512_vnni" in host_cpu_flags() else "_avx2"


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_qdq_layers_run_on_the_int8_kernel_and_match_onnx_runtime(target, tmp_path):
    model = qdq_mlp()
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    art = compile_model(model, target, tmp_path / "a", batch=4)
    assert art.meta["rewrites"] == ["int8-dense", "int8-requantize"]
    int8 = [k for k, v in art.meta["kernel_schedules"].items() if v == "kernel:int8_dense"]
    assert len(int8) == 2 and all(k.startswith(f"int8_dense{_flavor(target)}") for k in int8), int8
    runner = load_artifact(art.folder)
    batches = [sample_inputs(model, 4, seed) for seed in range(16)]  # 64 samples
    got = np.concatenate([runner(feeds)[0] for feeds in batches])
    ref = np.concatenate([run(model, feeds)[0] for feeds in batches])
    # integer accumulation is exact where ORT's QDQ float math rounds: at most one step of the
    # output's quantization scale apart; measured: every output bit-identical to ORT (64 samples,
    # both targets), so nearly all must be, and the top-1 answers with them
    out_scale = next(
        onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.name == [n for n in model.graph.node if n.op_type == "DequantizeLinear"][-1].input[1]
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(out_scale) * 1.01)
    assert np.mean(got == ref) >= 0.98
    assert np.mean(np.argmax(got, 1) == np.argmax(ref, 1)) >= 0.98


def test_arm_target_keeps_qdq_on_the_float_path(tmp_path):
    art = compile_model(qdq_mlp(), "arm", tmp_path / "a", batch=4)
    assert "int8-dense" not in art.meta["rewrites"]
    assert "kernel:int8_dense" not in art.meta["kernel_schedules"].values()


@pytest.mark.parametrize("isa_name", ["avx2", "avx2u8s8", pytest.param("vnni", marks=needs_vnni)])
@pytest.mark.parametrize("qdtype, zp", [("uint8", 128), ("int8", -3)])
@pytest.mark.parametrize(
    "shape, kernel, stride, pads, k",
    [
        ((1, 3, 10, 10), (3, 3), (1, 1), (1, 1, 1, 1), 16),
        ((2, 8, 9, 11), (3, 3), (2, 2), (1, 0, 2, 1), 8),
        ((1, 12, 6, 6), (1, 1), (1, 1), (0, 0, 0, 0), 24),
        ((1, 16, 8, 8), (5, 5), (1, 1), (2, 2, 2, 2), 32),
    ],
)
def test_int8_conv_kernel_is_exact_against_numpy(isa_name, qdtype, zp, shape, kernel, stride, pads, k):
    """Integer result exact (int64 reference on the input padded with the zero point), odd channel
    counts included; NHWC in and out."""
    isa, target, insn = _isa(isa_name)
    rng = np.random.default_rng(sum(shape) + k)
    info = np.iinfo(qdtype)
    q = rng.integers(info.min, info.max + 1, shape).astype(qdtype)
    w = _weights(rng, (k, shape[1], *kernel), isa)
    scale = rng.uniform(0.001, 0.1, k).astype(np.float32)
    offset = rng.standard_normal(k).astype(np.float32)
    lanes, g = conv_tile(k, isa)
    f = qconv2d_func(shape, kernel, stride, pads, k, zp, qdtype, isa)
    lib = tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)
    assert insn in lib.inspect_source("asm")
    pt, pl, pb, pr = pads
    shift = isa.zero_point(0, qdtype)  # int8 read as uint8 q + 128 on VNNI
    qp = np.pad(q.astype(np.int64) + shift, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=zp + shift)
    ho, wo = (qp.shape[2] - kernel[0]) // stride[0] + 1, (qp.shape[3] - kernel[1]) // stride[1] + 1
    acc = np.zeros((shape[0], ho, wo, k), np.int64)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            patch = qp[:, :, i : i + stride[0] * (ho - 1) + 1 : stride[0], j : j + stride[1] * (wo - 1) + 1 : stride[1]]
            acc += np.einsum("nchw,kc->nhwk", patch, w[:, :, i, j].astype(np.int64))
    y = tvm.runtime.tensor(np.full((shape[0], ho, wo, k), np.nan, np.float32))
    q_nhwc = np.ascontiguousarray(q.transpose(0, 2, 3, 1))
    bias = rng.standard_normal(k).astype(np.float32)
    lib["main"](
        *(tvm.runtime.tensor(a) for a in (q_nhwc, pack_conv_weights(w, lanes * g, isa), scale, offset, bias)), y
    )
    np.testing.assert_allclose(
        y.numpy(), (acc * scale.astype(np.float64) + offset + bias).astype(np.float32), rtol=1e-6, atol=1e-5
    )


def qdq_cnn(batch: int = 2):
    b = ModelBuilder("qcnn", (batch, 3, 12, 12), 0)
    x = b.relu(b.conv("input", 16, k=3))  # 3 input channels: an odd channel pair
    x = b.relu(b.conv(x, 24, k=3, stride=2))  # 24 outputs: 8-lane tiles
    x = b.add(b.conv(x, 24, k=1, pad=0), x)
    x = b.conv(x, 12, k=3)  # 12 outputs: not a multiple of 8, stays on the float path
    model = b.build(b.gemm(b.flatten(x), 10))
    data = Dataset({"input": np.random.default_rng(0).standard_normal((32, 3, 12, 12)).astype(np.float32)})
    qmodel, _ = apply(model, "quantize-int8", data=data)
    return qmodel


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_qdq_convolutions_run_on_the_int8_kernel_and_match_onnx_runtime(target, tmp_path):
    model = qdq_cnn()
    art = compile_model(model, target, tmp_path / "a", batch=2)
    assert "int8-conv" in art.meta["rewrites"]
    convs = [k for k, v in art.meta["kernel_schedules"].items() if v == "kernel:int8_conv2d"]
    assert len(convs) == 3 and all(k.startswith(f"int8_conv2d{_flavor(target)}") for k in convs), convs
    transposes = [k for k in art.meta["kernel_schedules"] if "transpose" in k]
    assert len(transposes) <= 2, transposes  # the model input's layout change and the Flatten's
    feeds = sample_inputs(model, 2)
    got, ref = load_artifact(art.folder)(feeds)[0], run(model, feeds)[0]
    # exact integer accumulation vs ORT's float QDQ math: a requantization can move by one step per
    # layer; bound the output by a few steps of its scale
    out_scale = next(
        onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.name == [n for n in model.graph.node if n.op_type == "DequantizeLinear"][-1].input[1]
    )
    assert np.max(np.abs(got - ref)) <= 4 * float(out_scale), np.max(np.abs(got - ref)) / float(out_scale)
    assert np.mean(np.abs(got - ref) <= 1.01 * float(out_scale)) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("model_fn, batch", [(qdq_mlp, 4), (qdq_cnn, 2)])
def test_qdq_layers_on_the_arm_dot_product_run_under_qemu(model_fn, batch, tmp_path):
    """``arm64-dot`` puts QDQ MatMul/Gemm and Conv layers on the sdot kernels; the AArch64 library,
    run under qemu, matches ORT on x86 within a few output quantization steps."""
    model = model_fn()
    art = compile_model(model, "arm64-dot", tmp_path / "arm", batch=batch)
    names = [k for k, v in art.meta["kernel_schedules"].items() if v.startswith("kernel:int8_")]
    assert len(names) == (2 if model_fn is qdq_mlp else 3) and all("_neondot" in k for k in names), names
    x = sample_inputs(model, batch)["input"]
    got = run_aarch64(tmp_path / "arm" / art.meta["library"], x, tmp_path)
    ref = run(model, {"input": x})[0]
    out_scale = next(
        onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.name == [n for n in model.graph.node if n.op_type == "DequantizeLinear"][-1].input[1]
    )
    assert np.max(np.abs(got - ref)) <= 4 * float(out_scale), np.max(np.abs(got - ref)) / float(out_scale)


@pytest.mark.parametrize("model_fn, batch", [(qdq_mlp, 4), (qdq_cnn, 2)])
def test_requantization_fused_into_the_int8_kernels_is_bit_identical(model_fn, batch, tmp_path, monkeypatch):
    """The bias add and QDQ chain after an int8 kernel, moved into its epilogue
    (``int8-requantize``), give exactly the outputs of the unfused path, and leave no separate
    elementwise kernel between two int8 layers."""
    import graphslim.kernels as kernels

    model = model_fn()
    feeds = sample_inputs(model, batch)
    fused = compile_model(model, "x86", tmp_path / "fused", batch=batch)
    assert "int8-requantize" in fused.meta["rewrites"]
    requant = [k for k in fused.meta["kernel_schedules"] if k.endswith("_requant")]
    assert len(requant) == (2 if model_fn is qdq_mlp else 3), fused.meta["kernel_schedules"]
    monkeypatch.setattr(kernels, "REWRITES", {k: v for k, v in kernels.REWRITES.items() if k != "int8-requantize"})
    plain = compile_model(model, "x86", tmp_path / "plain", batch=batch)
    assert "int8-requantize" not in plain.meta["rewrites"]
    assert len(plain.meta["kernel_schedules"]) > len(fused.meta["kernel_schedules"])
    np.testing.assert_array_equal(load_artifact(fused.folder)(feeds)[0], load_artifact(plain.folder)(feeds)[0])
