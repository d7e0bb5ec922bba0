"""int8 dense and convolution kernels for QDQ layers, and the Relax rewrites that use them (x86).

ONNX QDQ models (``quantize-int8``, or onnxruntime.quantization) import into Relax as
``matmul(dequantize(q), dequantize(W_int8))``: float math, so an int8 model runs no faster than
fp32. These rewrites compute such a layer on the integers instead:

    y[m, n] = s_x * s_w[n] * (sum_k q[m, k] * W[n, k] - zp_x * sum_k W[n, k])

with ``q`` the uint8/int8 activations, ``W`` the int8 weights (symmetric: zero points 0), int32
accumulation (exact), and the scale/offset applied per output in float. The result is exact
where ORT's float QDQ math is not, so outputs agree with ORT up to a float rounding that can
move a later requantization by one step. Three instruction sets, chosen from the target's CPU:

* AVX-512 VNNI (``vpdpbusd``, ``llvm.x86.avx512.vpdpbusd.512``): 64 uint8 x int8 products
  summed in fours into 16 int32 lanes per instruction, no saturation. Activations go as quads
  of bytes packed into one int32 and broadcast (int8 activations are shifted to uint8 by
  flipping their sign bit, the zero point moved by 128), weights as ``[N/T, K/4, T*4]`` int8.
* AVX2 (``vpmaddwd``, ``llvm.x86.avx2.pmadd.wd``): 16 int16 products summed pairwise into 8
  int32 lanes; activations as int16 pairs, weights ``[N/T, K/2, T*2]`` int8 sign-extended in
  the loop.
* AArch64 dot product (``sdot``, ``llvm.aarch64.neon.sdot.v4i32.v16i8``, ``+dotprod``: Cortex-A55
  / A76 and later, Neoverse): 16 int8 x int8 products summed in fours into 4 int32 lanes; uint8
  activations are shifted to int8 (zero point moved by -128), weights as for VNNI.

Both share one kernel body per op: :class:`Isa` says how activations pack into a word and which
instruction multiplies and accumulates. Per-tensor activation scale and zero point, per-tensor
or per-output-channel weight scale, zero weight zero points; dense: N a multiple of 16 (K padded
with zero weights); conv: groups 1, a multiple of 8 output channels. Other layers stay on the
dense float path (correct, not faster).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from graphslim.kernels.pipeline import static_shape
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

__all__ = [
    "AVX2",
    "AVX2_U8S8",
    "NEON_DOT",
    "VNNI",
    "Isa",
    "conv_tile",
    "dense_tile",
    "fuse_requantization",
    "has_vnni",
    "isa_for",
    "isa_for_weights",
    "pack_conv_weights",
    "pack_weights",
    "qconv2d_func",
    "qdense_func",
    "rewrite_int8_conv",
    "rewrite_int8_dense",
    "rewrite_int8_integer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Isa:
    """An int8 dot-product instruction: ``group`` activations (``bits`` wide each) packed into one
    int32 and broadcast, times ``group`` int8 weights per int32 lane, summed into ``lanes`` int32
    accumulators per instruction."""

    name: str
    group: int  # activations per int32 word: 4 bytes (vpdpbusd, sdot) or 2 int16 (vpmaddwd)
    bits: int  # width of one activation in the word
    signed: bool = False  # byte activations as int8 (sdot) instead of uint8 (vpdpbusd)
    # pairs of byte products summed in int16 with saturation (AVX2 vpmaddubsw), then in int32:
    # exact only while |w| <= 64 (255 * 64 * 2 < 2^15), see isa_for_weights
    saturating: bool = False

    def _shift(self, qdtype: str) -> int:
        """What the kernel adds to a byte activation so it fits the instruction's operand type:
        +128 for int8 on VNNI (uint8 operand), -128 for uint8 on NEON (int8 operand)."""
        if self.group != 4:
            return 0
        if self.signed:
            return -128 if qdtype == "uint8" else 0
        return 128 if qdtype == "int8" else 0

    def element(self, value: Any, qdtype: str) -> Any:
        """One activation as it sits in the word (flipping a byte's top bit adds or subtracts 128)."""
        from tvm.script import tirx as T

        if self.group == 4:
            return T.bitwise_xor(T.bitwise_and(T.Cast("int32", value), 255), 128 if self._shift(qdtype) else 0)
        return T.bitwise_and(T.Cast("int32", value), 65535)

    def pad_element(self, zp: int, qdtype: str) -> int:
        """The element standing for a padded input (the zero point, where the float input is 0)."""
        return (zp + self._shift(qdtype)) & 255 if self.group == 4 else zp & 65535

    def zero_point(self, zp: Any, qdtype: str) -> Any:
        """The zero point the kernel's integer sums are relative to (see :meth:`element`)."""
        return zp + self._shift(qdtype)

    def mac(self, lanes: int) -> Any:
        """``mac(acc, word, w)``: ``acc`` (int32 x lanes) plus the dot products of the broadcast
        ``word`` with the weights ``w`` (int8 x lanes*group)."""
        from tvm.script import tirx as T

        if self.saturating:  # AVX2 bytes: uint8 x int8 pairs -> int16 (saturating), pairs -> int32
            return lambda acc, word, w: (
                acc
                + T.call_llvm_pure_intrin(
                    "int32x8",
                    "llvm.x86.avx2.pmadd.wd",
                    T.call_llvm_pure_intrin(
                        "int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("int8x32", T.Broadcast(word, 8)), w
                    ),
                    T.Broadcast(T.int16(1), 16),
                )
            )
        if self.group == 4 and self.signed:  # AArch64 dot product: int8 x int8 -> int32, 4 lanes
            return lambda acc, word, w: T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, T.reinterpret("int8x16", T.Broadcast(word, 4)), w
            )
        if self.group == 4:  # AVX-512 VNNI: no saturation, uint8 x int8 -> int32
            return lambda acc, word, w: T.call_llvm_pure_intrin(
                f"int32x{lanes}",
                f"llvm.x86.avx512.vpdpbusd.{lanes * 32}",
                acc,
                T.reinterpret(f"int8x{lanes * 4}", T.Broadcast(word, lanes)),
                w,
            )
        return lambda acc, word, w: (
            acc
            + T.call_llvm_pure_intrin(  # AVX2: int16 x int16 -> int32 pairs
                "int32x8",
                "llvm.x86.avx2.pmadd.wd",
                T.reinterpret("int16x16", T.Broadcast(word, 8)),
                T.Cast("int16x16", w),
            )
        )


VNNI = Isa("vnni", 4, 8)
AVX2 = Isa("avx2", 2, 16)
#: AVX2 on bytes (ONNX Runtime's MLAS uses the same instruction pair for uint8 x int8): 32
#: products per ``vpmaddubsw`` against ``vpmaddwd``'s 16 on int16-widened operands, 1.3x the
#: speed on a transformer's shapes (AMD EPYC, 128x256x512: 67-82 against 49-50 GMAC/s), for
#: weights within +-64: ``quantize-int8{reduce_range=true}`` (7-bit weights, as ONNX Runtime's
#: ``reduce_range``) writes them.
AVX2_U8S8 = Isa("avx2u8s8", 4, 8, saturating=True)
NEON_DOT = Isa("neondot", 4, 8, signed=True)

#: The largest weight magnitude :data:`AVX2_U8S8` sums exactly (two uint8 x int8 products in int16).
SATURATION_FREE_WEIGHT = 64


def has_vnni(target: Any) -> bool:
    """Whether an LLVM ``target``'s CPU has AVX-512 VNNI (with the byte/word and VL extensions the
    512- and 256-bit ``vpdpbusd`` need)."""
    from tvm.target.codegen import target_has_features

    try:
        return all(bool(target_has_features(f, target)) for f in ("avx512vnni", "avx512bw", "avx512vl"))
    except Exception:  # noqa: BLE001 - not an x86 target
        return False


def isa_for(target: Any) -> Isa | None:
    """The int8 instruction set of an LLVM ``target``: VNNI, AVX2, AArch64 dot product, or None
    (the QDQ layers stay on the float path)."""
    from graphslim.kernels.schedules import vector_bits
    from tvm.target.codegen import target_has_features

    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        try:
            return NEON_DOT if target_has_features("dotprod", target) else None
        except Exception:  # noqa: BLE001 - feature unknown to this LLVM
            return None
    if has_vnni(target):
        return VNNI
    return AVX2 if vector_bits(target) >= 256 else None


def isa_for_weights(isa: Isa, w: np.ndarray) -> Isa:
    """The instruction set a kernel with the int8 weights ``w`` runs on: :data:`AVX2_U8S8` where
    the target's is :data:`AVX2` and every weight is within +-64 (so no int16 pair saturates),
    else ``isa``."""
    if isa is AVX2 and w.size and int(np.abs(w.astype(np.int16)).max()) <= SATURATION_FREE_WEIGHT:
        return AVX2_U8S8
    return isa


def _words(k: int, isa: Isa) -> int:
    return -(-k // isa.group)


def pack_weights(w: np.ndarray, tile: int, isa: Isa) -> np.ndarray:
    """int8 ``w`` [N, K] -> int8 [N/tile, ceil(K/group), tile*group]: per tile of outputs and group
    of inputs, each output's ``group`` weights (K padded with zeros), as the instruction takes them."""
    n, k = w.shape
    kw_ = _words(k, isa)
    padded = np.zeros((n, kw_ * isa.group), np.int8)
    padded[:, :k] = w
    return np.ascontiguousarray(padded.reshape(n // tile, tile, kw_, isa.group).transpose(0, 2, 1, 3)).reshape(
        n // tile, kw_, tile * isa.group
    )


def pack_conv_weights(w: np.ndarray, tile: int, isa: Isa) -> np.ndarray:
    """int8 OIHW ``w`` [K, C, KH, KW] -> int8 [K/tile, KH, KW, ceil(C/group), tile*group]: per tile
    of outputs and per tap, each output's weights for a group of input channels (zeros past C)."""
    k, c, kh, kw = w.shape
    cw = _words(c, isa)
    padded = np.zeros((k, cw * isa.group, kh, kw), np.int8)
    padded[:, :c] = w
    tiles = padded.reshape(k // tile, tile, cw, isa.group, kh, kw).transpose(0, 4, 5, 2, 1, 3)
    return np.ascontiguousarray(tiles).reshape(k // tile, kh, kw, cw, tile * isa.group)


def dense_tile(m: int, n: int, isa: Isa) -> tuple[int, int, int]:
    """(rows, int32 lanes per vector, vectors) of the dense kernel's register tile. VNNI: 4 zmm
    (64 outputs) by up to 4 rows where the shape allows (measured best on Emerald Rapids,
    1024x1024: 0.076 ms at batch 32 against 0.081-0.13 for 8x2, 8x1, 16x1, 4x2 and 2x4 tiles; at
    batch 1, 1x4 and 1x8 tie). AVX2: 2 ymm (16 outputs) by up to 4 rows. NEON: 4 q registers."""
    if isa is VNNI:
        g = next(g for g in (4, 2, 1) if n % (16 * g) == 0)
        return next(d for d in (4, 3, 2, 1) if m % d == 0 and d * g <= 16), 16, g
    if isa is NEON_DOT:  # 32 q registers: 16 outputs (4 vectors) by up to 4 rows
        return next(d for d in (4, 3, 2, 1) if m % d == 0), 4, 4
    return next(d for d in (4, 3, 2, 1) if m % d == 0), 8, 2


def conv_tile(k: int, isa: Isa) -> tuple[int, int]:
    """(int32 lanes per vector, vectors per tile) of the conv kernel for ``k`` output channels."""
    if isa is VNNI and k % 16 == 0:
        return 16, 2 if k % 32 == 0 else 1
    if isa is NEON_DOT:
        return 4, 4 if k % 16 == 0 else 2
    return 8, 2 if k % 16 == 0 else 1


def qdense_func(
    m: int,
    k: int,
    n: int,
    qdtype: str = "uint8",
    isa: Isa = AVX2,
    out_dtype: str = "float32",
    epilogue: Any = None,
    zero_points: int | None = None,
) -> Any:
    """PrimFunc ``(q[m,k] qdtype, w[n/T, ceil(k/group), T*group] int8, scale[n], offset[n], bias[n],
    y[m,n] out_dtype)`` with ``T = lanes * vectors`` from :func:`dense_tile` (``n`` a multiple of
    16): ``y = epilogue((acc * scale + offset) + bias)`` (see :func:`fuse_requantization`).

    With ``zero_points`` (1, or ``m``: one per row), the activations' zero points are a run-time
    input instead (dynamic quantization): PrimFunc ``(q[m,k], zp[zero_points] int32, w, wsum[n]
    int32, y[m,n] int32)`` with ``y = sum_k (q - zp) * W`` exactly, ``ONNX MatMulInteger``'s
    result; ``wsum[n] = sum_k W[n, k]``.

    Long: one TVMScript kernel definition, whose two entry points share the packing and
    register-tile macros and the tile geometry they close over, so it reads as one piece."""
    from tvm.script import tirx as T

    epilogue = epilogue or (lambda v: v)

    grp = isa.group
    kw_ = _words(k, isa)
    rt, lanes, g = dense_tile(m, n, isa)
    tile = lanes * g
    mac = isa.mac(lanes)
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py
    zr = zero_points or 1
    tag = {"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_dense"}

    @T.macro
    def pack_words(q, words):  # activation groups packed once per call into int32 words, broadcast below
        for i in loop(m):
            for p in range(kw_):
                words[i, p] = 0
                for b in T.unroll(grp):
                    words[i, p] = words[i, p] + T.shift_left(
                        T.if_then_else(p * grp + b < k, isa.element(q[i, p * grp + b], qdtype), 0), b * isa.bits
                    )

    @T.macro
    def accumulate(words, w, acc, ro, jo):  # the int32 sums of one register tile
        for r in T.unroll(rt):
            for j in T.vectorized(tile):
                acc[r, j] = 0
        for p in range(kw_):
            for r in T.unroll(rt):
                for v in T.unroll(g):
                    acc[r, T.Ramp(v * lanes, 1, lanes)] = mac(
                        acc[r, T.Ramp(v * lanes, 1, lanes)],
                        words[ro * rt + r, p],
                        w[jo, p, T.Ramp(v * lanes * grp, 1, lanes * grp)],
                    )

    @T.prim_func(private=True, s_tir=True)
    def qdense(
        q: T.Buffer((m, k), qdtype),
        w: T.Buffer((n // tile, kw_, tile * grp), "int8"),
        scale: T.Buffer((n,), "float32"),
        offset: T.Buffer((n,), "float32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), out_dtype),
    ):
        T.func_attr(tag)
        words = T.alloc_buffer((m, kw_), "int32")
        pack_words(q, words)
        for jo in loop(n // tile):
            acc = T.alloc_buffer((rt, tile), "int32", scope="global")
            for ro in range(m // rt):
                accumulate(words, w, acc, ro, jo)
                for r in T.unroll(rt):
                    for j in T.vectorized(tile):
                        y[ro * rt + r, jo * tile + j] = epilogue(
                            (T.Cast("float32", acc[r, j]) * scale[jo * tile + j] + offset[jo * tile + j])
                            + bias[jo * tile + j]
                        )

    @T.prim_func(private=True, s_tir=True)
    def qdense_zp(
        q: T.Buffer((m, k), qdtype),
        zp: T.Buffer((zr,), "int32"),
        w: T.Buffer((n // tile, kw_, tile * grp), "int8"),
        wsum: T.Buffer((n,), "int32"),
        y: T.Buffer((m, n), "int32"),
    ):
        T.func_attr(tag)
        words = T.alloc_buffer((m, kw_), "int32")
        pack_words(q, words)
        for jo in loop(n // tile):
            acc = T.alloc_buffer((rt, tile), "int32", scope="global")
            for ro in range(m // rt):
                accumulate(words, w, acc, ro, jo)
                for r in T.unroll(rt):
                    for j in T.vectorized(tile):
                        # the kernel's sums are relative to the shifted zero point (Isa.zero_point)
                        y[ro * rt + r, jo * tile + j] = (
                            acc[r, j] - isa.zero_point(zp[(ro * rt + r) % zr], qdtype) * wsum[jo * tile + j]
                        )

    return qdense if zero_points is None else qdense_zp


def qconv2d_func(
    shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    k: int,
    zp: int,
    qdtype: str = "uint8",
    isa: Isa = AVX2,
    out_dtype: str = "float32",
    epilogue: Any = None,
) -> Any:
    """int8 direct convolution: PrimFunc ``(q[N, H, W, C] qdtype, w[K/T, KH, KW, ceil(C/group),
    T*group] int8, scale[K], offset[K], y[N, Ho, Wo, K] float32)``; ``shape`` is (N, C, H, W) and
    ``T`` from :func:`conv_tile`.

    One pass repacks ``q`` into words of ``group`` channels (as the instruction takes them) with
    the padding filled with the zero point ``zp`` (where the float input is 0), so the integer sum
    over the padded window is exact and the zero-point correction a per-output constant (in
    ``offset``). Then per output row and tile of ``T`` channels, ``wt`` output pixels accumulate in
    int32 registers, one instruction per vector per tap and word. ``bias`` [K], ``out_dtype`` and
    ``epilogue`` as in :func:`qdense_func`.

    Long: one TVMScript kernel definition (the repacking pass and the register-tiled loop nest
    that reads its words), which reads as one piece."""
    from tvm.script import tirx as T

    epilogue = epilogue or (lambda v: v)

    n, c, h, wd = shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, wd + pl + pr
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    grp = isa.group
    cw = _words(c, isa)
    lanes, g = conv_tile(k, isa)
    tile = lanes * g
    pad = isa.pad_element(zp, qdtype)
    mac = isa.mac(lanes)
    budget = 24 if isa in (VNNI, NEON_DOT) else 12  # accumulators: 16 ymm / 32 zmm or q registers
    wt = next(d for d in range(min(wo, budget // g), 0, -1) if wo % d == 0)
    loop = T.parallel if n * ho * wo * k * c * kh * kw >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qconv2d(
        q: T.Buffer((n, h, wd, c), qdtype),
        w: T.Buffer((k // tile, kh, kw, cw, tile * grp), "int8"),
        scale: T.Buffer((k,), "float32"),
        offset: T.Buffer((k,), "float32"),
        bias: T.Buffer((k,), "float32"),
        y: T.Buffer((n, ho, wo, k), out_dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_conv2d"})
        words = T.alloc_buffer((n, hp, wp, cw), "int32")
        for b_h in loop(n * hp):
            for x_w, p in T.grid(wp, cw):
                words[b_h // hp, b_h % hp, x_w, p] = 0
                for b in T.unroll(grp):
                    words[b_h // hp, b_h % hp, x_w, p] = words[b_h // hp, b_h % hp, x_w, p] + T.shift_left(
                        T.if_then_else(
                            p * grp + b >= c,
                            0,
                            T.if_then_else(
                                b_h % hp >= pt and b_h % hp < pt + h and x_w >= pl and x_w < pl + wd,
                                isa.element(q[b_h // hp, b_h % hp - pt, x_w - pl, p * grp + b], qdtype),
                                pad,
                            ),
                        ),
                        b * isa.bits,
                    )
        for fused in loop(k // tile * n * ho):
            acc = T.alloc_buffer((wt, tile), "int32", scope="global")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(tile):
                        acc[t, j] = 0
                for rh, rw, p in T.grid(kh, kw, cw):
                    for t in T.unroll(wt):
                        for v in T.unroll(g):
                            acc[t, T.Ramp(v * lanes, 1, lanes)] = mac(
                                acc[t, T.Ramp(v * lanes, 1, lanes)],
                                words[fused % (n * ho) // ho, fused % ho * sh + rh, (wo_o * wt + t) * sw + rw, p],
                                w[fused // (n * ho), rh, rw, p, T.Ramp(v * lanes * grp, 1, lanes * grp)],
                            )
                for t in T.unroll(wt):
                    for j in T.vectorized(tile):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * tile + j] = epilogue(
                            (
                                T.Cast("float32", acc[t, j]) * scale[fused // (n * ho) * tile + j]
                                + offset[fused // (n * ho) * tile + j]
                            )
                            + bias[fused // (n * ho) * tile + j]
                        )

    return qconv2d


def _relax_ops(*names: str) -> dict[str, Any]:
    """``{name: tvm.ir.Op.get("relax.<name>")}`` for the ops a rewrite looks at."""
    import tvm

    return {name: tvm.ir.Op.get(f"relax.{name}") for name in names}


def _const(expr: Any) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def _qdq_contraction(call: Any, bound: Any, ops: dict[str, Any]) -> tuple[Any, ...] | None:
    """``op(dequantize(q, s_x, zp_x), [permute_dims](dequantize(W, s_w, zp_w)))`` with constant
    int8 ``W``, zero ``zp_w`` and per-tensor ``s_x``/``zp_x`` -> (q, s_x, zp_x, W, s_w, axis,
    transposed), or None."""
    from tvm import relax

    a, b = bound(call.args[0]), bound(call.args[1])
    if not (isinstance(a, relax.Call) and a.op == ops["dequantize"]):
        return None
    transposed = isinstance(b, relax.Call) and b.op == ops["permute_dims"]
    if transposed:
        if [int(x) for x in b.attrs.axes] != [1, 0]:
            return None
        b = bound(b.args[0])
    if not (isinstance(b, relax.Call) and b.op == ops["dequantize"]):
        return None
    w, s_w, zp_w = (_const(e) for e in b.args)
    s_x, zp_x = _const(a.args[1]), _const(a.args[2])
    q = a.args[0]
    if any(v is None for v in (w, s_w, zp_w, s_x, zp_x)) or w.dtype != np.int8 or np.any(zp_w):
        return None
    if str(q.ty.dtype) not in ("uint8", "int8") or s_x.size != 1 or zp_x.size != 1:
        return None
    return q, s_x, zp_x, w, s_w, int(b.attrs.axis) % w.ndim, transposed


def _int8_rewrite(mod: Any, spec: dict[str, Any], op: str, build: Any) -> tuple[Any, bool]:
    """Run ``build(builder, call, isa, *operands) -> new expr | None`` on every ``relax.<op>`` call
    whose operands match :func:`_qdq_contraction`. Targets with an int8 instruction set only
    (:func:`isa_for`)."""
    import tvm

    isa = isa_for(tvm.target.Target(spec)) if spec.get("kind") == "llvm" else None
    if isa is None:
        return mod, False
    from graphslim.kernels.pipeline import rewrite_calls

    ops = _relax_ops("matmul", "dequantize", "permute_dims")

    def rewrite(builder: Any, call: Any, bound: Any) -> Any:
        operands = _qdq_contraction(call, bound, ops)
        return None if operands is None else build(builder, call, isa, *operands)

    return rewrite_calls(mod, [tvm.ir.Op.get(f"relax.{op}")], rewrite)


def _scale_offset(s_x: np.ndarray, zp_x: np.ndarray, s_w: np.ndarray, wsum: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-output float scale ``s_x * s_w[n]`` and offset ``-scale * zp_x * sum_k W[n, k]``."""
    n = wsum.shape[0]
    scale = (float(s_x.reshape(())) * np.broadcast_to(s_w.reshape(-1), (n,))).astype(np.float32)
    offset = (-scale.astype(np.float64) * float(zp_x.reshape(())) * wsum).astype(np.float32)
    return scale, offset


def rewrite_int8_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-dense"]``, run on the module as imported,
    before constants fold): ``matmul(dequantize(q), [permute_dims](dequantize(W_int8)))`` ->
    :func:`qdense_func`; ``q`` [..., K] of any rank >= 2 (N-D layers through a ``reshape`` to
    [M, K] and back). Targets with an int8 instruction set (:func:`isa_for`): x86 with AVX2 or
    VNNI, AArch64 with the dot product."""
    from tvm import relax

    def build(
        builder: Any, call: Any, isa: Isa, q: Any, s_x: Any, zp_x: Any, w: Any, s_w: Any, axis: int, transposed: bool
    ) -> Any:
        xs = [int(d) for d in q.ty.shape]
        if w.ndim != 2 or len(xs) < 2:
            return None
        # an N-D layer ([B, S, K] x [K, N] in a transformer) is a 2-D product over B*S rows
        lead, xs = xs[:-1], [int(np.prod(xs[:-1])), xs[-1]]
        # W as [N, K] (outputs x inputs) and the weight scale per output
        if transposed:  # Gemm transB: W is [N, K], per-channel on axis 0
            wn, per_out = w, axis == 0
        else:  # MatMul: W is [K, N], per-channel on axis 1
            wn, per_out = w.T, axis == 1
        n, k = wn.shape
        qdtype = str(q.ty.dtype)
        isa = isa_for_weights(isa, wn)
        if s_w.size not in (1, n) or (s_w.size == n and not per_out) or n % 16 or xs[1] != k:
            return None
        _, lanes, g = dense_tile(xs[0], n, isa)
        zp = isa.zero_point(zp_x.astype(np.int64), qdtype)
        scale, offset = _scale_offset(s_x, zp, s_w, wn.astype(np.int64).sum(axis=1))
        args = {"op": "dense", "m": xs[0], "k": k, "n": n, "qdtype": qdtype, "isa": isa.name}
        gv = builder.add_func(_tagged(qdense_func(xs[0], k, n, qdtype, isa), args), f"int8_dense_{isa.name}")
        rows = q if len(lead) == 1 else builder.emit(relax.op.reshape(q, xs))
        out = relax.call_tir(
            gv,
            [
                rows,
                relax.const(pack_weights(wn, lanes * g, isa)),
                relax.const(scale),
                relax.const(offset),
                relax.const(np.zeros(n, np.float32)),
            ],
            relax.TensorType((xs[0], n), "float32"),
        )
        return out if len(lead) == 1 else relax.op.reshape(builder.emit(out), (*lead, n))

    return _int8_rewrite(mod, spec, "matmul", build)


def rewrite_int8_conv(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-conv"]``, on the module as imported):
    NCHW ``conv2d(dequantize(q), dequantize(W_int8))`` (groups 1, no dilation, output channels a
    multiple of 8, per-tensor or per-output-channel weight scale) -> :func:`qconv2d_func` between
    two ``permute_dims`` (NCHW -> NHWC -> NCHW); the CPU pipeline moves them down through the
    elementwise QDQ ops that follow, so between two such layers they cancel. Targets as for
    :func:`rewrite_int8_dense`."""
    from tvm import relax

    def build(
        builder: Any, call: Any, isa: Isa, q: Any, s_x: Any, zp_x: Any, w: Any, s_w: Any, axis: int, transposed: bool
    ) -> Any:
        a = call.attrs
        if (
            transposed
            or w.ndim != 4
            or (a.data_layout, a.kernel_layout, a.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW")
        ):
            return None
        if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation):
            return None
        xs = [int(d) for d in q.ty.shape]
        k = w.shape[0]
        if len(xs) != 4 or xs[1] != w.shape[1] or k % 8 or s_w.size not in (1, k) or (s_w.size == k and axis != 0):
            return None
        qdtype, zp = str(q.ty.dtype), int(zp_x.reshape(()))
        isa = isa_for_weights(isa, w)
        pads = tuple(int(p) for p in a.padding)  # top, left, bottom, right
        geometry = (tuple(xs), (w.shape[2], w.shape[3]), tuple(int(s) for s in a.strides), pads, k, zp)
        func = _tagged(
            qconv2d_func(*geometry, qdtype, isa),
            {"op": "conv2d", "geometry": geometry, "qdtype": qdtype, "isa": isa.name},
        )
        lanes, g = conv_tile(k, isa)
        packed = pack_conv_weights(w, lanes * g, isa)
        scale, offset = _scale_offset(
            s_x, np.asarray(isa.zero_point(zp, qdtype)), s_w, w.reshape(k, -1).astype(np.int64).sum(axis=1)
        )
        gv = builder.add_func(func, f"int8_conv2d_{isa.name}")
        out = [int(d) for d in call.ty.shape]  # N, K, Ho, Wo
        # NHWC in and out; the pipeline's transpose sinking cancels these between layers
        q_nhwc = builder.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
        nhwc = builder.emit(
            relax.call_tir(
                gv,
                [
                    q_nhwc,
                    relax.const(packed),
                    relax.const(scale),
                    relax.const(offset),
                    relax.const(np.zeros(k, np.float32)),
                ],
                relax.TensorType((out[0], out[2], out[3], k), "float32"),
            )
        )
        return relax.op.permute_dims(nhwc, [0, 3, 1, 2])

    return _int8_rewrite(mod, spec, "nn.conv2d", build)


@dataclass(frozen=True, eq=False)
class _IntegerMatmul:
    """What :func:`rewrite_int8_integer` replaces: ``q`` [*lead, K] (uint8/int8), its zero point
    ``zp`` (None: none subtracted), the int8 weight ``w`` [K, N], and ``rows``, the number of
    zero points (1: per tensor, ``m``: one per row)."""

    q: Any
    zp: Any | None
    w: np.ndarray
    lead: tuple[int, ...]
    rows: int

    @property
    def m(self) -> int:
        return int(np.prod(self.lead))

    @property
    def qdtype(self) -> str:
        return str(self.q.ty.dtype)


def _is_call(expr: Any, op: Any) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and expr.op == op


def _widened(expr: Any, bound: Any, ops: dict[str, Any]) -> Any:
    """``x`` where ``expr`` is ``astype(x, "int32")`` (through ``expand_dims``), else None."""
    e = bound(expr)
    if _is_call(e, ops["expand_dims"]):
        e = bound(e.args[0])
    return e.args[0] if _is_call(e, ops["astype"]) and str(e.attrs.dtype) == "int32" else None


def _integer_operands(call: Any, bound: Any, ops: dict[str, Any]) -> tuple[Any, Any, np.ndarray] | None:
    """Pattern: (q, zp or None, W) of an int32 ``matmul(astype(q) [- astype(zp)], astype(W) [-
    astype(zp_w)])`` with a constant 2-D int8 ``W`` and zero ``zp_w``, or None."""
    a, b = bound(call.args[0]), bound(call.args[1])
    zp = None
    if _is_call(a, ops["subtract"]):
        zp = _widened(a.args[1], bound, ops)
        a = bound(a.args[0])
        if zp is None:
            return None
    q = a.args[0] if _is_call(a, ops["astype"]) and str(a.attrs.dtype) == "int32" else None
    if _is_call(b, ops["subtract"]):
        zw = _widened(b.args[1], bound, ops)
        zw = None if zw is None else _const(zw)
        if zw is None or np.any(zw):
            return None
        b = bound(b.args[0])
    w = _const(b.args[0]) if _is_call(b, ops["astype"]) else None
    if q is None or w is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    return q, zp, w


def _check_integer(q: Any, zp: Any, w: np.ndarray) -> _IntegerMatmul | None:
    """Check: ``q`` of static rank >= 2 matching ``w``, N a multiple of 16, byte activations,
    and a zero point per tensor or per row."""
    xs = static_shape(q)
    k, n = w.shape
    if xs is None or len(xs) < 2 or xs[-1] != k or n % 16 or str(q.ty.dtype) not in ("uint8", "int8"):
        return None
    lead, m = xs[:-1], int(np.prod(xs[:-1]))
    zs = [] if zp is None else static_shape(zp)
    if zs is None:
        return None
    if int(np.prod(zs, dtype=np.int64)) == 1:
        rows = 1
    elif zs in ([*lead, 1], [m], [m, 1]):
        rows = m
    else:
        return None
    return _IntegerMatmul(q, zp, w, tuple(lead), rows)


def _integer_call(builder: Any, match: _IntegerMatmul, isa: Isa) -> Any:
    """Rewrite: :func:`qdense_func` with run-time zero points on ``match`` (flattened to 2-D
    rows and back), the exact int32 product."""
    from tvm import relax

    q, lead, m = match.q, list(match.lead), match.m
    k, n = match.w.shape
    isa = isa_for_weights(isa, match.w)
    zp_arg = (
        relax.const(np.zeros(1, np.int32))
        if match.zp is None
        else builder.emit(relax.op.reshape(relax.op.astype(match.zp, "int32"), (match.rows,)))
    )
    _, lanes, g = dense_tile(m, n, isa)
    wn = np.ascontiguousarray(match.w.T)  # [N, K]
    func = qdense_func(m, k, n, match.qdtype, isa, zero_points=match.rows)
    gv = builder.add_func(func, f"int8_dense_{isa.name}")
    flat = q if len(lead) == 1 else builder.emit(relax.op.reshape(q, (m, k)))
    out = relax.call_tir(
        gv,
        [
            flat,
            zp_arg,
            relax.const(pack_weights(wn, lanes * g, isa)),
            relax.const(wn.astype(np.int32).sum(axis=1).astype(np.int32)),
        ],
        relax.TensorType((m, n), "int32"),
    )
    return out if len(lead) == 1 else relax.op.reshape(builder.emit(out), (*lead, n))


def rewrite_int8_integer(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-integer"]``, on the module as imported):
    ONNX ``MatMulInteger`` with a constant int8 weight, which TVM imports as an int32 ``matmul`` of
    ``astype(q) [- astype(zp)]`` and ``astype(W) [- astype(zp_w)]``, -> :func:`qdense_func` with
    run-time zero points: the activations' zero point per tensor (``DynamicQuantizeLinear``, ONNX
    Runtime's ``quantize_dynamic``), per row (a ``[..., 1]`` zero point: per-token dynamic
    quantization) or none (``quantize-int8``'s per-token form subtracts it after the product). The
    result is the same exact int32 tensor; the scales that follow stay in the graph, where TVM
    fuses them into one elementwise kernel. Weight zero points must be zero (int8 symmetric
    weights), outputs a multiple of 16; ``q`` of any rank (a 2-D product over its rows). Targets
    with an int8 instruction set (:func:`isa_for`). Pattern :func:`_integer_operands`, check
    :func:`_check_integer`, rewrite :func:`_integer_call`."""
    import tvm

    isa = isa_for(tvm.target.Target(spec)) if spec.get("kind") == "llvm" else None
    if isa is None:
        return mod, False
    from graphslim.kernels.pipeline import rewrite_calls

    ops = _relax_ops("matmul", "astype", "subtract", "expand_dims")

    def rewrite(builder: Any, call: Any, bound: Any) -> Any:
        if str(call.ty.dtype) != "int32":
            return None
        found = _integer_operands(call, bound, ops)
        match = None if found is None else _check_integer(*found)
        return None if match is None else _integer_call(builder, match, isa)

    return rewrite_calls(mod, [ops["matmul"]], rewrite)


_ISAS = {isa.name: isa for isa in (VNNI, AVX2, AVX2_U8S8, NEON_DOT)}


def _tagged(func: Any, args: dict[str, Any]) -> Any:
    """``func`` carrying the arguments that rebuild it (read by :func:`fuse_requantization`)."""
    import json

    return func.with_attr("graphslim.int8_kernel", json.dumps(args))


def _rebuild(tag: str, out_dtype: str, epilogue: Any) -> Any:
    import json

    a = json.loads(tag)
    isa = _ISAS[a["isa"]]
    if a["op"] == "dense":
        func = qdense_func(a["m"], a["k"], a["n"], a["qdtype"], isa, out_dtype, epilogue)
    else:
        geometry = [tuple(v) if isinstance(v, list) else v for v in a["geometry"]]
        func = qconv2d_func(*geometry, a["qdtype"], isa, out_dtype, epilogue)
    return _tagged(func, a)


def _scalar(expr: Any) -> float | int | None:
    v = _const(expr)
    return None if v is None or v.size != 1 else v.reshape(()).item()


#: Relax ops :func:`fuse_requantization` looks at.
_REQUANT_OPS = ("add", "quantize", "dequantize", "nn.relu", "call_tir", "reshape")


@dataclass(frozen=True, eq=False)
class _RequantStep:
    """One op after an int8 kernel that moves into the kernel's epilogue; ``var`` is the variable
    its result is bound to. ``kind`` and ``arg``: "reshape" (an N-D layer's reshape back from
    [M, N], which moves after the kernel; no arg), "bias" (the per-channel float32 constant [N]),
    "quantize" / "dequantize" ((scale as float32, zero point, out dtype)) or "relu" (no arg)."""

    var: Any
    kind: str
    arg: Any = None


@dataclass(frozen=True, eq=False)
class _RequantMatch:
    """What :func:`fuse_requantization` fuses: the ``call_tir`` of an int8 kernel (tagged by
    :func:`_tagged`) and the steps after it, in order, the last one a quantize."""

    kernel: Any
    steps: tuple[_RequantStep, ...]

    @property
    def end(self) -> Any:
        """The variable the fused kernel's result is bound to (the last step's)."""
        return self.steps[-1].var

    @property
    def out_dtype(self) -> str:
        """The dtype the fused kernel writes: the last quantize's."""
        return next(s.arg[2] for s in reversed(self.steps) if s.kind == "quantize")

    @property
    def bias(self) -> np.ndarray | None:
        return next((s.arg for s in self.steps if s.kind == "bias"), None)

    @property
    def reshaped(self) -> bool:
        """Whether an N-D layer's reshape back from [M, N] moves after the fused kernel."""
        return any(s.kind == "reshape" for s in self.steps)

    @property
    def epilogue_steps(self) -> tuple[_RequantStep, ...]:
        """The steps applied per element (the bias is the kernel's own argument)."""
        return tuple(s for s in self.steps if s.kind not in ("bias", "reshape"))


def _requant_step(
    call: Any, var: Any, chain: list[_RequantStep], k: int, ops: dict[str, Any]
) -> tuple[str, Any] | None:
    """Pattern: (kind, arg) of ``call``, the only user of ``var``, as the next step of ``chain``
    (the steps after an int8 kernel with ``k`` outputs so far), or None where the chain stops."""
    # PyTorch exports add the bias first: Add(bias, x)
    commuted = call.op == ops["add"] and len(call.args) == 2 and call.args[1].same_as(var)
    if not call.args[0].same_as(var) and not commuted:
        return None
    if call.op == ops["reshape"] and not chain:
        # an N-D layer's reshape back from [M, N]: elementwise steps commute with it
        return ("reshape", None) if int(call.ty.shape[-1]) == k else None
    if call.op == ops["add"] and (not chain or chain[-1].kind == "reshape"):
        # a bias add only right after the kernel (or its reshape back to N-D), not broadcasting
        # the result to a higher rank
        c = _const(call.args[0 if commuted else 1])
        if c is not None and c.dtype == np.float32 and c.size == k and c.shape[-1] == k and c.ndim <= len(var.ty.shape):
            return "bias", c.reshape(k)
        return None
    if commuted:
        return None
    if call.op == ops["quantize"] or call.op == ops["dequantize"]:
        s_, z_ = _scalar(call.args[1]), _scalar(call.args[2])
        out = str(call.attrs.out_dtype)
        if s_ is not None and z_ is not None and (call.op == ops["dequantize"]) == (out == "float32"):
            return ("quantize" if call.op == ops["quantize"] else "dequantize"), (np.float32(s_), int(z_), out)
        return None
    if call.op == ops["nn.relu"]:
        return "relu", None
    return None


def _requant_chain(
    var: Any, users: dict[Any, list[Any]], bound: dict[Any, Any], k: int, ops: dict[str, Any]
) -> list[_RequantStep]:
    """Pattern: the steps after ``var`` (an int8 kernel's result), each the only user of the one
    before (:func:`_requant_step`)."""
    from tvm import relax

    chain: list[_RequantStep] = []
    while True:
        uses = users.get(var, [])
        if len(uses) != 1:
            return chain
        nxt = uses[0]
        call = bound.get(nxt)
        if not isinstance(call, relax.Call) or not call.args:
            return chain
        step = _requant_step(call, var, chain, k, ops)
        if step is None:
            return chain
        chain.append(_RequantStep(nxt, *step))
        var = nxt


def _check_requant(kernel: Any, chain: list[_RequantStep]) -> _RequantMatch | None:
    """Check: the chain, cut back to its last quantize (stopping on a float tensor would gain
    little), or None where it has none."""
    while chain and chain[-1].kind != "quantize":
        chain = chain[:-1]
    if not chain:
        log.debug("int8-requantize: %s: no quantize after the kernel, left as it is", kernel.args[0].name_hint)
        return None
    return _RequantMatch(kernel, tuple(chain))


def _requant_matches(mod: Any, func: Any, ops: dict[str, Any]) -> tuple[_RequantMatch, ...]:
    """Every int8 kernel call in ``func``'s dataflow blocks whose chain passes
    :func:`_check_requant`."""
    from tvm import relax

    matches = []
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        users = {v: list(us) for v, us in relax.analysis.udchain(block).items()}
        bound = {b.var: b.value for b in block.bindings if isinstance(b, relax.VarBinding)}
        for var, value in bound.items():
            if not (isinstance(value, relax.Call) and value.op == ops["call_tir"]):
                continue
            attrs = getattr(mod[value.args[0]], "attrs", None)
            if attrs is None or "graphslim.int8_kernel" not in attrs:
                continue
            chain = _requant_chain(var, users, bound, int(value.ty.shape[-1]), ops)
            match = _check_requant(value, chain)
            if match is not None:
                matches.append(match)
    return tuple(matches)


def _requant_epilogue(steps: tuple[_RequantStep, ...]) -> Any:
    """The TIR epilogue applying ``steps`` to a kernel's float32 result, as TVM legalizes them."""
    from tvm.script import tirx as T

    def epilogue(v: Any) -> Any:
        for step in steps:
            if step.kind == "quantize":
                s_, z_, out = step.arg
                info = np.iinfo(out)
                v = T.Cast(
                    out,
                    T.max(T.min(T.round(v / T.float32(s_)) + T.float32(z_), T.float32(info.max)), T.float32(info.min)),
                )
            elif step.kind == "dequantize":
                s_, z_, _ = step.arg
                v = T.Cast("float32", T.Cast("int32", v) - z_) * T.float32(s_)
            elif step.kind == "relu":
                v = T.max(v, T.float32(0))
        return v

    return epilogue


def _fused_kernel_call(builder: Any, visit: Any, mod: Any, match: _RequantMatch) -> Any:
    """Rewrite: the call of ``match``'s kernel rebuilt with its steps as the epilogue (the bias
    as the kernel's argument; the reshape back to N-D after it), to bind to ``match.end``."""
    from tvm import relax

    call = match.kernel
    kernel = builder.add_func(
        _rebuild(
            str(mod[call.args[0]].attrs["graphslim.int8_kernel"]),
            match.out_dtype,
            _requant_epilogue(match.epilogue_steps),
        ),
        f"{call.args[0].name_hint}_requant",
    )
    args = list(call.args[1].fields)
    if match.bias is not None:
        args[-1] = relax.const(match.bias.astype(np.float32))
    new = relax.call_tir(
        kernel,
        [visit(a) for a in args],
        relax.TensorType(tuple(int(d) for d in call.ty.shape), match.out_dtype),
    )
    if match.reshaped:  # the N-D shape, after the fused chain
        new = relax.op.reshape(builder.emit(new), match.end.ty.shape)
    return new


def _fuse_requant_matches(mod: Any, gv: Any, func: Any, matches: tuple[_RequantMatch, ...]) -> Any:
    """``mod`` with ``func`` (bound to ``gv``) rewritten: each match's end variable bound to its
    fused kernel call (:func:`_fused_kernel_call`); the unfused chain is left for dead-code
    elimination."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Fuse(relax.PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:
            match = next((m for m in matches if m.end.same_as(binding.var)), None)
            if match is None:
                return super().visit_var_binding_(binding)
            new = _fused_kernel_call(self.builder_, self.visit_expr, mod, match)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))

    mutator = Fuse(mod)
    mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def fuse_requantization(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-requantize"]``, after constants fold):
    the elementwise ops that follow an int8 kernel, up to the next layer's input (a per-channel
    bias ``add``, then per-tensor ``quantize`` / ``dequantize`` and ``relu``, each the only user of
    the one before; for an N-D layer, after the ``reshape`` back from [M, N], which then moves
    after the kernel), move into the kernel's epilogue, so the kernel writes the requantized uint8 /
    int8 tensor the next int8 layer reads instead of a float32 tensor that a separate kernel
    reads back. The epilogue repeats TVM's legalization of those ops (same float operations in the
    same order: ``clip(round(v / s) + zp)``, ``(int32(q) - zp) * s``), so results are bit-identical
    to the unfused path (a test compares them).

    In three steps, state passed as values: pattern (:func:`_requant_chain`: the ops after each
    int8 kernel call), check (:func:`_check_requant`: a chain that ends in a quantize, as a
    :class:`_RequantMatch`), rewrite (:func:`_fuse_requant_matches`)."""
    from tvm import relax

    if spec.get("kind") != "llvm":
        return mod, False
    ops = _relax_ops(*_REQUANT_OPS)
    fused = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        matches = _requant_matches(mod, func, ops)
        if matches:
            mod = _fuse_requant_matches(mod, gv, func, matches)
            fused += len(matches)
    if not fused:
        return mod, False
    return relax.transform.DeadCodeElimination()(mod), True
