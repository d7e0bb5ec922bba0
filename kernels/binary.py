"""Binary-weight dense and convolution kernels (1-bit packed weights), and the Relax rewrite.

``quantize-binary`` leaves layers whose weight is ``alpha[n] * S[n, k]`` with ``S`` in {-1, +1}
(a DequantizeLinear of an int8 sign tensor with the per-channel scale ``alpha``) and float
activations. These kernels store ``S`` as one bit per weight (32x smaller than fp32) and compute

    y[m, n] = alpha[n] * sum_k x[m, k] * S[n, k] + bias[n]        (optionally ReLU)

exactly in float32: a layer's result matches the dense float layer up to float summation order.

How the bits are used: weights are packed per tile of ``L * G`` outputs as ``bits[N/(L*G), K, G]``,
one ``L``-bit word per input and ``L`` outputs (bit ``j`` set where that output's sign is -1).
With ``L = 8`` (AVX2, NEON) a 256-row table maps each byte to the 8 floats ``+-1.0`` it stands
for: per input and byte, one byte load and one FMA whose operand is a table row in L1. With
``L = 16`` (AVX-512) a 16-bit word goes into a mask register (``vptestnmd``) that selects +1 or -1
per lane (``vblendmps``), once per input, for every row or output pixel of the register tile.
Either way: the fp32 FMA rate with a 32x smaller weight stream. So the kernel wins where the
dense layer is memory bound (batch 1) and is at FMA speed where it is compute bound (batch 32);
benchmarks/RESULTS.md has the numbers. It cannot beat the FMA rate: with float activations every
weight still costs one add, and XNOR/popcount arithmetic (TVM's removed ``bitserial_dense``) needs
*binarized activations*, which these layers do not have (it would change the model's outputs).
Quantized activations times binary weights already go to the int8 kernels (``vpdpbusd`` does 64
multiply-adds per instruction; a bit-serial popcount over 8 activation planes does fewer).

The kernels are plain TIR (no intrinsics), so they compile for aarch64 (NEON) as well as x86.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

__all__ = [
    "LANE_BITS",
    "SIGN_TABLE",
    "binary_conv2d_func",
    "binary_dense_func",
    "decode_table",
    "lanes_for",
    "pack_signs",
    "rewrite_binary",
    "split_binary",
]

#: Row ``b``: the 8 floats ``+-1.0`` that byte ``b`` of packed signs stands for (bit set: -1).
SIGN_TABLE = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, -1.0, 1.0).astype(np.float32)
#: For 16-lane words: lane ``j`` tests bit ``1 << j``.
LANE_BITS = (1 << np.arange(16, dtype=np.int32)).reshape(1, 16)


def decode_table(lanes: int) -> np.ndarray:
    """The kernels' ``decode`` argument: :data:`SIGN_TABLE` for 8 lanes, :data:`LANE_BITS` for 16."""
    return SIGN_TABLE if lanes == 8 else LANE_BITS


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


def pack_signs(negative: np.ndarray, groups: int, lanes: int = 8) -> np.ndarray:
    """bool [N, K] -> ``bits[N/(lanes*groups), K, groups]`` (uint8 for 8 lanes, uint16 for 16; bit
    j of word g: output ``tile*lanes*groups + g*lanes + j``); N a multiple of ``lanes * groups``."""
    n, k = negative.shape
    tiles = negative.reshape(n // (lanes * groups), groups, lanes, k).transpose(0, 3, 1, 2)  # [tiles, K, G, L]
    packed = np.packbits(tiles, axis=-1, bitorder="little")  # [tiles, K, G, lanes / 8] bytes
    return np.ascontiguousarray(packed).view("<u2")[..., 0] if lanes == 16 else packed[..., 0]


def _sign(lanes: int) -> Any:
    """``sign(decode, word, j)``: the +-1.0 of lane ``j`` of a packed word, as the kernels compute
    it: an 8-float row of the byte table (one load, folded into the FMA), or on 16-lane AVX-512
    ``word & (1 << j)`` (``vptestmd`` into a mask register) selecting -1 or +1 (``vblendmps``),
    computed once per input and reused by every row of the register tile."""
    from tvm.script import tirx as T

    if lanes == 8:
        return lambda decode, word, j: decode[T.Cast("int32", word), j]
    return lambda decode, word, j: T.Select(
        T.bitwise_and(T.Cast("int32", word), decode[0, j]) != 0, T.float32(-1), T.float32(1)
    )


def _buffers(lanes: int) -> tuple[str, tuple[int, int], str]:
    """(word dtype, decode shape, decode dtype) for a lane count."""
    return ("uint8", (256, 8), "float32") if lanes == 8 else ("uint16", (1, 16), "int32")


def lanes_for(target: Any, n: int) -> int:
    """16 lanes (AVX-512, one zmm per word) when the target has 512-bit vectors and ``n`` allows,
    else 8 (the byte table: AVX2, NEON)."""
    from graphslim.kernels.schedules import vector_bits

    return 16 if n % 16 == 0 and vector_bits(target) >= 512 else 8


def _groups(n: int, rows: int, lanes: int = 8) -> int:
    """Words (``lanes`` outputs each) per tile: enough independent accumulators to hide the FMA
    latency, not more than fit in registers (16 ymm / 32 zmm), and dividing ``n / lanes``."""
    budget = 12 if lanes == 8 else 24
    return next(g for g in (8, 4, 2, 1) if (n // lanes) % g == 0 and (rows * g <= budget or g == 1))


def _row_tile(m: int) -> int:
    """Rows of ``x`` per register tile: up to 6 (6 x 16 outputs = 12 accumulators, MLAS's fp32
    shape); fewer rows than that only when ``m`` is smaller."""
    return min(m, 6)


def binary_dense_func(m: int, k: int, n: int, groups: int, relu: bool = False, lanes: int = 8) -> Any:
    """PrimFunc ``(x[m,k], bits[n/(L*G), k, G], decode, alpha[n], bias[n], y[m,n])`` for ``L =
    lanes`` (8: uint8 words and the byte table; 16: uint16 words and :data:`LANE_BITS`). Rows go in
    tiles of :func:`_row_tile` and one tail tile of the remaining rows."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38  # ReLU as max(v, lo); -3.4e38 (float32 lowest) leaves v as it is
    gl = lanes * groups
    word_t, decode_shape, decode_t = _buffers(lanes)
    sign = _sign(lanes)
    rt = _row_tile(m)
    tail = m % rt
    tail_at = m - tail
    tt = max(tail, 1)
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.macro
    def row_tile(x, bits, decode, alpha, bias, y, acc, rows, base, io):  # ``rows`` rows of x from ``base``
        for r in T.unroll(rows):
            for j in T.vectorized(gl):
                acc[r, j] = T.float32(0)
        for kk in range(k):
            for r in T.unroll(rows):
                for g in T.unroll(groups):
                    for j in T.vectorized(lanes):
                        acc[r, g * lanes + j] = acc[r, g * lanes + j] + x[base + r, kk] * sign(
                            decode, bits[io, kk, g], j
                        )
        for r in T.unroll(rows):
            for j in T.vectorized(gl):
                y[base + r, io * gl + j] = T.max(acc[r, j] * alpha[io * gl + j] + bias[io * gl + j], T.float32(lo))

    @T.prim_func(private=True, s_tir=True)
    def binary_dense(
        x: T.Buffer((m, k), "float32"),
        bits: T.Buffer((n // gl, k, groups), word_t),
        decode: T.Buffer(decode_shape, decode_t),
        alpha: T.Buffer((n,), "float32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "binary_dense"})
        for io in loop(n // gl):
            acc = T.alloc_buffer((rt, gl), "float32", scope="global")
            for ro in range(m // rt):
                row_tile(x, bits, decode, alpha, bias, y, acc, rt, ro * rt, io)
            if tail > 0:
                acc_t = T.alloc_buffer((tt, gl), "float32", scope="global")
                row_tile(x, bits, decode, alpha, bias, y, acc_t, tail, tail_at, io)

    return binary_dense


def binary_conv2d_func(
    shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, int],
    k: int,
    groups: int,
    relu: bool = False,
    lanes: int = 8,
) -> Any:
    """Direct binary convolution on padded NHWC ``x`` [N, Hp, Wp, C]: PrimFunc ``(x, bits[K/(L*G),
    KH*KW*C, G] (inputs in (kh, kw, c) order), decode, alpha[K], bias[K], y[N, Ho, Wo, K])``, words
    and ``decode`` as in :func:`binary_dense_func`. Each thread owns a tile of ``L*G`` output
    channels and one output row; ``wt`` output pixels share every decoded word."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38
    n, hp, wp, c = shape
    kh, kw = kernel
    sh, sw = stride
    ho, wo = out_hw
    gl = lanes * groups
    word_t, decode_shape, decode_t = _buffers(lanes)
    sign = _sign(lanes)
    budget = 12 if lanes == 8 else 24
    wt = next(d for d in (12, 8, 7, 6, 5, 4, 3, 2, 1) if wo % d == 0 and d * groups <= budget)
    loop = T.parallel if n * ho * wo * k * kh * kw * c >= PARALLEL_MIN_MACS else T.serial

    @T.prim_func(private=True, s_tir=True)
    def binary_conv2d(
        x: T.Buffer((n, hp, wp, c), "float32"),
        bits: T.Buffer((k // gl, kh * kw * c, groups), word_t),
        decode: T.Buffer(decode_shape, decode_t),
        alpha: T.Buffer((k,), "float32"),
        bias: T.Buffer((k,), "float32"),
        y: T.Buffer((n, ho, wo, k), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "binary_conv2d"})
        for fused in loop(k // gl * n * ho):
            acc = T.alloc_buffer((wt, gl), "float32", scope="global")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(gl):
                        acc[t, j] = T.float32(0)
                for rh, rw, rc in T.grid(kh, kw, c):
                    for t in T.unroll(wt):
                        for g in T.unroll(groups):
                            for j in T.vectorized(lanes):
                                acc[t, g * lanes + j] = acc[t, g * lanes + j] + x[
                                    fused % (n * ho) // ho, fused % ho * sh + rh, (wo_o * wt + t) * sw + rw, rc
                                ] * sign(decode, bits[fused // (n * ho), (rh * kw + rw) * c + rc, g], j)
                for t in T.unroll(wt):
                    for j in T.vectorized(gl):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * gl + j] = T.max(
                            acc[t, j] * alpha[fused // (n * ho) * gl + j] + bias[fused // (n * ho) * gl + j],
                            T.float32(lo),
                        )

    return binary_conv2d


def rewrite_binary(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["binary"]``): ``matmul`` and NHWC ``conv2d``
    (groups 1, no dilation) whose constant weight is binary (each output's weights are
    ``+-alpha``; ``quantize-binary``'s DequantizeLinear has folded by then) and whose output count
    is a multiple of 8 -> :func:`binary_dense_func` / :func:`binary_conv2d_func`. CPU targets only."""
    if spec.get("kind") != "llvm":
        return mod, False
    import tvm
    from graphslim.kernels.rewrite import ConvShape, KernelCall, rewrite_contractions

    target = tvm.target.Target(spec)

    def dense(m: int, wt: np.ndarray) -> KernelCall | None:
        split = split_binary(wt)
        if split is None or wt.shape[0] % 8:
            return None
        lanes = lanes_for(target, wt.shape[0])
        groups = _groups(wt.shape[0], _row_tile(m), lanes)
        make = functools.partial(binary_dense_func, m, wt.shape[1], wt.shape[0], groups, lanes=lanes)
        return KernelCall(
            "binary_dense", make, [pack_signs(split[0], groups, lanes), decode_table(lanes), split[1]], "binary"
        )

    def conv(s: ConvShape, w: np.ndarray) -> KernelCall | None:
        matrix = np.ascontiguousarray(w.transpose(3, 0, 1, 2)).reshape(s.k, -1)  # [K, (kh, kw, c)]
        split = split_binary(matrix)
        if split is None or s.k % 8:
            return None
        lanes = lanes_for(target, s.k)
        groups = 2 if s.k % (2 * lanes) == 0 else 1  # output pixels fill the rest of the register tile
        make = functools.partial(
            binary_conv2d_func,
            (s.n, s.hp, s.wp, s.c),
            (s.kh, s.kw),
            (s.sh, s.sw),
            (s.ho, s.wo),
            s.k,
            groups,
            lanes=lanes,
        )
        return KernelCall(
            "binary_conv2d", make, [pack_signs(split[0], groups, lanes), decode_table(lanes), split[1]], "binary"
        )

    mod, labels = rewrite_contractions(mod, dense, conv)
    return mod, bool(labels)
