"""Binary-weight dense and convolution kernels (1-bit packed weights), and the Relax rewrite.

``quantize-binary`` leaves layers whose weight is ``alpha[n] * S[n, k]`` with ``S`` in {-1, +1}
(a DequantizeLinear of an int8 sign tensor with the per-channel scale ``alpha``) and float
activations. These kernels store ``S`` as one bit per weight (32x smaller than fp32) and compute

    y[m, n] = alpha[n] * sum_k x[m, k] * S[n, k] + bias[n]        (optionally ReLU)

exactly in float32: a layer's result matches the dense float layer up to float summation order.

How the bits are used: weights are packed per tile of ``8 * G`` outputs as ``bits[N/(8G), K, G]``
(uint8; bit ``j`` of byte ``g`` set where ``S[tile*8G + g*8 + j, k] = -1``), and a 256-row table
maps each byte to the 8 floats ``+-1.0`` it stands for. The inner loop is then, per input and per
byte, one byte load and one FMA whose operand is a table row in L1: the fp32 FMA rate, with a
32x smaller weight stream. So the kernel wins where the dense layer is memory bound (batch 1:
1024x1024, 2.9x over graphslim's fp32 kernel on this project's AVX2 machine) and is at FMA speed
where it is compute bound (batch 32). It cannot beat the FMA rate: with float activations every
weight still costs one add, and XNOR/popcount arithmetic (TVM's removed ``bitserial_dense``) needs
*binarized activations*, which these layers do not have (it would change the model's outputs).
Quantized activations times binary weights already go to the int8 kernel (``vpmaddwd`` does 16
multiply-adds per instruction; a bit-serial popcount over 8 activation planes does fewer on AVX2).

The kernels are plain TIR (no intrinsics), so they compile for aarch64 (NEON) as well as x86.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

__all__ = ["SIGN_TABLE", "binary_conv2d_func", "binary_dense_func", "pack_signs", "rewrite_binary", "split_binary"]

#: Row ``b``: the 8 floats ``+-1.0`` that byte ``b`` of packed signs stands for (bit set: -1).
SIGN_TABLE = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, -1.0, 1.0).astype(np.float32)


def split_binary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``w`` [N, K] float -> (signs bool [N, K] (True: negative), alpha [N]) when every row takes
    exactly the values ``+-alpha[n]`` (a binary layer, after the DequantizeLinear folded), else None.
    Rows of zeros are allowed (alpha 0)."""
    if w.ndim != 2 or w.size == 0 or not np.all(np.isfinite(w)):
        return None
    alpha = np.abs(w).max(axis=1)
    if not np.array_equal(np.abs(w), np.broadcast_to(alpha[:, None], w.shape)):
        return None
    if not np.any(alpha):
        return None  # an all-zero weight is not a binary layer
    return np.signbit(w) & (alpha[:, None] > 0), alpha.astype(np.float32)


def pack_signs(negative: np.ndarray, groups: int) -> np.ndarray:
    """bool [N, K] -> uint8 ``bits[N/(8*groups), K, groups]`` (bit j of byte g: output
    ``tile*8*groups + g*8 + j``); N must be a multiple of ``8 * groups``."""
    n, k = negative.shape
    tiles = negative.reshape(n // (8 * groups), groups, 8, k).transpose(0, 3, 1, 2)  # [tiles, K, G, 8]
    return np.packbits(tiles, axis=-1, bitorder="little")[..., 0]


def _groups(n: int, rows: int) -> int:
    """Bytes (8 outputs each) per tile: enough independent accumulators (rows x groups >= 8) to
    hide the FMA latency, not more than fit in registers, and dividing ``n / 8``."""
    return next(g for g in (8, 4, 2, 1) if (n // 8) % g == 0 and (rows * g <= 12 or g == 1))


def _row_tile(m: int) -> int:
    """Rows of ``x`` per register tile: up to 6 (6 x 16 outputs = 12 accumulators, MLAS's fp32
    shape); fewer rows than that only when ``m`` is smaller."""
    return min(m, 6)


def binary_dense_func(m: int, k: int, n: int, groups: int, relu: bool = False) -> Any:
    """PrimFunc ``(x[m,k], bits[n/(8G), k, G] uint8, table[256, 8], alpha[n], bias[n], y[m,n])``.
    Rows go in tiles of :func:`_row_tile` and one tail tile of the remaining rows."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38  # ReLU as max(v, lo); -3.4e38 (float32 lowest) leaves v as it is
    g8 = 8 * groups
    rt = _row_tile(m)
    tail = m % rt
    tail_at = m - tail
    tt = max(tail, 1)
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def binary_dense(x: T.Buffer((m, k), "float32"), bits: T.Buffer((n // g8, k, groups), "uint8"),
                     table: T.Buffer((256, 8), "float32"), alpha: T.Buffer((n,), "float32"),
                     bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "binary_dense"})
        for io in loop(n // g8):
            acc = T.alloc_buffer((rt, g8), "float32", scope="local")
            for ro in range(m // rt):
                for r in T.unroll(rt):
                    for j in T.vectorized(g8):
                        acc[r, j] = T.float32(0)
                for kk in range(k):
                    for r in T.unroll(rt):
                        for g in T.unroll(groups):
                            for j in T.vectorized(8):
                                acc[r, g * 8 + j] = acc[r, g * 8 + j] + x[ro * rt + r, kk] * table[
                                    T.Cast("int32", bits[io, kk, g]), j]
                for r in T.unroll(rt):
                    for j in T.vectorized(g8):
                        y[ro * rt + r, io * g8 + j] = T.max(acc[r, j] * alpha[io * g8 + j] + bias[io * g8 + j],
                                                            T.float32(lo))
            if tail > 0:
                acc_t = T.alloc_buffer((tt, g8), "float32", scope="local")
                for r in T.unroll(tail):
                    for j in T.vectorized(g8):
                        acc_t[r, j] = T.float32(0)
                for kk in range(k):
                    for r in T.unroll(tail):
                        for g in T.unroll(groups):
                            for j in T.vectorized(8):
                                acc_t[r, g * 8 + j] = acc_t[r, g * 8 + j] + x[tail_at + r, kk] * table[
                                    T.Cast("int32", bits[io, kk, g]), j]
                for r in T.unroll(tail):
                    for j in T.vectorized(g8):
                        y[tail_at + r, io * g8 + j] = T.max(acc_t[r, j] * alpha[io * g8 + j] + bias[io * g8 + j],
                                                            T.float32(lo))

    return binary_dense


def binary_conv2d_func(shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                       out_hw: tuple[int, int], k: int, groups: int, relu: bool = False) -> Any:
    """Direct binary convolution on padded NHWC ``x`` [N, Hp, Wp, C]: PrimFunc ``(x, bits[K/(8G),
    KH*KW*C, G] uint8 (inputs in (kh, kw, c) order), table, alpha[K], bias[K], y[N, Ho, Wo, K])``.
    Each thread owns a tile of ``8G`` output channels and one output row; ``wt`` output pixels
    share every table row loaded."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38
    n, hp, wp, c = shape
    kh, kw = kernel
    sh, sw = stride
    ho, wo = out_hw
    g8 = 8 * groups
    wt = next(d for d in (6, 5, 4, 3, 2, 1) if wo % d == 0 and d * groups <= 12)
    loop = T.parallel if n * ho * wo * k * kh * kw * c >= PARALLEL_MIN_MACS else T.serial

    @T.prim_func(private=True, s_tir=True)
    def binary_conv2d(x: T.Buffer((n, hp, wp, c), "float32"), bits: T.Buffer((k // g8, kh * kw * c, groups), "uint8"),
                      table: T.Buffer((256, 8), "float32"), alpha: T.Buffer((k,), "float32"),
                      bias: T.Buffer((k,), "float32"), y: T.Buffer((n, ho, wo, k), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "binary_conv2d"})
        for fused in loop(k // g8 * n * ho):
            acc = T.alloc_buffer((wt, g8), "float32", scope="local")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(g8):
                        acc[t, j] = T.float32(0)
                for rh, rw, rc in T.grid(kh, kw, c):
                    for t in T.unroll(wt):
                        for g in T.unroll(groups):
                            for j in T.vectorized(8):
                                acc[t, g * 8 + j] = acc[t, g * 8 + j] + x[
                                    fused % (n * ho) // ho, fused % ho * sh + rh, (wo_o * wt + t) * sw + rw, rc
                                ] * table[T.Cast("int32", bits[fused // (n * ho), (rh * kw + rw) * c + rc, g]), j]
                for t in T.unroll(wt):
                    for j in T.vectorized(g8):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * g8 + j] = T.max(
                            acc[t, j] * alpha[fused // (n * ho) * g8 + j] + bias[fused // (n * ho) * g8 + j],
                            T.float32(lo))

    return binary_conv2d


def rewrite_binary(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["binary"]``): ``matmul`` and NHWC ``conv2d``
    (groups 1, no dilation) whose constant weight is binary (each output's weights are
    ``+-alpha``; ``quantize-binary``'s DequantizeLinear has folded by then) and whose output count
    is a multiple of 8 -> :func:`binary_dense_func` / :func:`binary_conv2d_func`. CPU targets only."""
    if spec.get("kind") != "llvm":
        return mod, False
    from graphslim.kernels.rewrite import ConvShape, KernelCall, rewrite_contractions

    def dense(m: int, wt: np.ndarray) -> KernelCall | None:
        split = split_binary(wt)
        if split is None or wt.shape[0] % 8:
            return None
        groups = _groups(wt.shape[0], _row_tile(m))
        make = functools.partial(binary_dense_func, m, wt.shape[1], wt.shape[0], groups)
        return KernelCall("binary_dense", make, [pack_signs(split[0], groups), SIGN_TABLE, split[1]], "binary")

    def conv(s: ConvShape, w: np.ndarray) -> KernelCall | None:
        matrix = np.ascontiguousarray(w.transpose(3, 0, 1, 2)).reshape(s.k, -1)  # [K, (kh, kw, c)]
        split = split_binary(matrix)
        if split is None or s.k % 8:
            return None
        groups = _groups(s.k, 1)
        groups = next(g for g in (2, 1) if g <= groups)  # 16 channels per tile; output pixels fill the rest
        make = functools.partial(binary_conv2d_func, (s.n, s.hp, s.wp, s.c), (s.kh, s.kw), (s.sh, s.sw),
                                 (s.ho, s.wo), s.k, groups)
        return KernelCall("binary_conv2d", make, [pack_signs(split[0], groups), SIGN_TABLE, split[1]], "binary")

    mod, labels = rewrite_contractions(mod, dense, conv)
    return mod, bool(labels)
