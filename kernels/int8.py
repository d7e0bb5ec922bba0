"""int8 dense and convolution kernels for QDQ layers, and the Relax rewrites that use them (x86).

ONNX QDQ models (``quantize-int8``, or onnxruntime.quantization) import into Relax as
``matmul(dequantize(q), dequantize(W_int8))``: float math, so an int8 model runs no faster than
fp32. These rewrites compute such a layer on the integers instead:

    y[m, n] = s_x * s_w[n] * (sum_k q[m, k] * W[n, k] - zp_x * sum_k W[n, k])

with ``q`` the uint8/int8 activations, ``W`` the int8 weights (symmetric: zero points 0), int32
accumulation (exact), and the scale/offset applied per output in float. The result is exact
where ORT's float QDQ math is not, so outputs agree with ORT up to a float rounding that can
move a later requantization by one step. Two instruction sets, chosen from the target's CPU:

* AVX-512 VNNI (``vpdpbusd``, ``llvm.x86.avx512.vpdpbusd.512``): 64 uint8 x int8 products
  summed in fours into 16 int32 lanes per instruction, no saturation. Activations go as quads
  of bytes packed into one int32 and broadcast (int8 activations are shifted to uint8 by
  flipping their sign bit, the zero point moved by 128), weights as ``[N/T, K/4, T*4]`` int8.
* AVX2 (``vpmaddwd``, ``llvm.x86.avx2.pmadd.wd``): 16 int16 products summed pairwise into 8
  int32 lanes; activations as int16 pairs, weights ``[N/16, K/2, 16*2]`` int8 sign-extended
  in the loop.

Per-tensor activation scale and zero point, per-tensor or per-output-channel weight scale,
zero weight zero points; dense: N a multiple of 16 (K padded with zero weights); conv: groups 1,
a multiple of 8 output channels. Other layers stay on the dense float path (correct, not faster).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

__all__ = ["has_vnni", "pack_conv_weights", "pack_conv_weights_vnni", "pack_weights", "pack_weights_vnni",
           "qconv2d_func", "qconv2d_vnni_func", "qdense_func", "qdense_vnni_func", "rewrite_int8_conv",
           "rewrite_int8_dense"]

NB = 16  # outputs per tile: two AVX2 int32 vectors


def pack_weights(w: np.ndarray) -> np.ndarray:
    """int8 ``w`` [N, K] -> int16 [N/16, K/2, 32]: for each tile and input pair, the 16 outputs'
    (w[n, 2p], w[n, 2p+1]) pairs, as ``vpmaddwd`` consumes them."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // NB, NB, k // 2, 2).transpose(0, 2, 1, 3)
                                ).reshape(n // NB, k // 2, NB * 2)


def has_vnni(target: Any) -> bool:
    """Whether an LLVM ``target``'s CPU has AVX-512 VNNI (with the byte/word and VL extensions the
    512- and 256-bit ``vpdpbusd`` need)."""
    from tvm.target.codegen import target_has_features

    try:
        return all(bool(target_has_features(f, target)) for f in ("avx512vnni", "avx512bw", "avx512vl"))
    except Exception:  # noqa: BLE001 - not an x86 target
        return False


def _quads(k: int) -> int:
    return (k + 3) // 4


def pack_weights_vnni(w: np.ndarray, tile: int) -> np.ndarray:
    """int8 ``w`` [N, K] -> int8 [N/tile, ceil(K/4), tile*4]: per tile of outputs and quad of
    inputs, each output's 4 weights (K padded with zeros), as ``vpdpbusd`` takes them."""
    n, k = w.shape
    kq = _quads(k)
    padded = np.zeros((n, kq * 4), np.int8)
    padded[:, :k] = w
    return np.ascontiguousarray(padded.reshape(n // tile, tile, kq, 4).transpose(0, 2, 1, 3)).reshape(
        n // tile, kq, tile * 4)


def _vnni_dense_tile(m: int, n: int) -> tuple[int, int]:
    """(rows, 16-lane vectors) per register tile: 4 vectors (64 outputs) by up to 4 rows where
    the shape allows (measured best on Emerald Rapids, 1024x1024: 0.076 ms at batch 32 against
    0.081-0.13 for 8x2, 8x1, 16x1, 4x2, 2x4 tiles; at batch 1, 1x4 and 1x8 tie)."""
    g = next(g for g in (4, 2, 1) if n % (16 * g) == 0)
    rt = next(d for d in (4, 3, 2, 1) if m % d == 0 and d * g <= 16)
    return rt, g


def qdense_vnni_func(m: int, k: int, n: int, qdtype: str = "uint8") -> Any:
    """PrimFunc ``(q[m,k] qdtype, w[n/T, ceil(k/4), T*4] int8, scale[n], offset[n], y[m,n] float32)``
    with ``T = 16 * g`` from :func:`_vnni_dense_tile`; int8 activations are read as uint8
    ``q + 128`` (the caller's offset uses the zero point plus 128)."""
    from tvm.script import tirx as T

    kq = _quads(k)
    rt, g = _vnni_dense_tile(m, n)
    tile = 16 * g
    flip = 128 if qdtype == "int8" else 0  # int8 -> uint8: flip the sign bit of each byte
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qdense_vnni(q: T.Buffer((m, k), qdtype), w: T.Buffer((n // tile, kq, tile * 4), "int8"),
                    scale: T.Buffer((n,), "float32"), offset: T.Buffer((n,), "float32"),
                    y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_dense"})
        # activation quads packed once per call as int32 (4 bytes), broadcast below
        quads = T.alloc_buffer((m, kq), "int32")
        for i in loop(m):
            for p in range(kq):
                quads[i, p] = 0
                for b in T.unroll(4):
                    quads[i, p] = quads[i, p] + T.shift_left(T.if_then_else(
                        p * 4 + b < k, T.bitwise_xor(T.bitwise_and(T.Cast("int32", q[i, p * 4 + b]), 255), flip), 0),
                        b * 8)
        for jo in loop(n // tile):
            acc = T.alloc_buffer((rt, tile), "int32", scope="local")
            for ro in range(m // rt):
                for r in T.unroll(rt):
                    for j in T.vectorized(tile):
                        acc[r, j] = 0
                for p in range(kq):
                    for r in T.unroll(rt):
                        for v in T.unroll(g):
                            acc[r, T.Ramp(v * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[r, T.Ramp(v * 16, 1, 16)],
                                T.reinterpret("int8x64", T.Broadcast(quads[ro * rt + r, p], 16)),
                                w[jo, p, T.Ramp(v * 64, 1, 64)])
                for r in T.unroll(rt):
                    for j in T.vectorized(tile):
                        y[ro * rt + r, jo * tile + j] = (T.Cast("float32", acc[r, j]) * scale[jo * tile + j]
                                                         + offset[jo * tile + j])

    return qdense_vnni


def qdense_func(m: int, k: int, n: int, qdtype: str = "uint8") -> Any:
    """PrimFunc ``(q[m,k] qdtype, w[n/16, k/2, 32] int16, scale[n], offset[n], y[m,n] float32)``."""
    from tvm.script import tirx as T

    kp = k // 2
    rt = next(d for d in (4, 3, 2, 1) if m % d == 0)
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qdense(q: T.Buffer((m, k), qdtype), w: T.Buffer((n // NB, kp, NB * 2), "int8"),
               scale: T.Buffer((n,), "float32"), offset: T.Buffer((n,), "float32"),
               y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_dense"})
        # activation pairs packed once per call as int32 (two int16 halves), broadcast below
        pairs = T.alloc_buffer((m, kp), "int32")
        for i in loop(m):
            for p in range(kp):
                pairs[i, p] = T.bitwise_or(T.bitwise_and(T.Cast("int32", q[i, p * 2]), 65535),
                                           T.shift_left(T.Cast("int32", q[i, p * 2 + 1]), 16))
        for jo in loop(n // NB):
            acc = T.alloc_buffer((rt, NB), "int32", scope="local")
            for ro in range(m // rt):
                for r in T.unroll(rt):
                    for j in T.vectorized(NB):
                        acc[r, j] = 0
                for p in range(kp):
                    for r in T.unroll(rt):
                        for g in T.unroll(2):
                            acc[r, T.Ramp(g * 8, 1, 8)] = acc[r, T.Ramp(g * 8, 1, 8)] + T.call_llvm_pure_intrin(
                                "int32x8", "llvm.x86.avx2.pmadd.wd",
                                T.reinterpret("int16x16", T.Broadcast(pairs[ro * rt + r, p], 8)),
                                T.Cast("int16x16", w[jo, p, T.Ramp(g * 16, 1, 16)]))
                for r in T.unroll(rt):
                    for j in T.vectorized(NB):
                        y[ro * rt + r, jo * NB + j] = (T.Cast("float32", acc[r, j]) * scale[jo * NB + j]
                                                       + offset[jo * NB + j])

    return qdense


def pack_conv_weights(w: np.ndarray, lanes: int) -> np.ndarray:
    """int8 OIHW ``w`` [K, C, KH, KW] -> int16 [K/lanes, KH, KW, ceil(C/2), lanes*2]: per tile of
    ``lanes`` outputs and per tap, the (w[o, 2p], w[o, 2p+1]) input-channel pairs (an odd last
    channel is paired with a zero weight)."""
    k, c, kh, kw = w.shape
    cp = (c + 1) // 2
    padded = np.zeros((k, 2 * cp, kh, kw), np.int16)
    padded[:, :c] = w
    tiles = padded.reshape(k // lanes, lanes, cp, 2, kh, kw).transpose(0, 4, 5, 2, 1, 3)
    return np.ascontiguousarray(tiles).reshape(k // lanes, kh, kw, cp, lanes * 2)


def qconv2d_func(shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 pads: tuple[int, int, int, int], k: int, lanes: int, zp: int, qdtype: str = "uint8") -> Any:
    """int8 direct convolution: PrimFunc ``(q[N, H, W, C] qdtype, w[K/lanes, KH, KW, C/2, lanes*2]
    int16, scale[K], offset[K], y[N, Ho, Wo, K] float32)``; ``shape`` is (N, C, H, W).

    One pass repacks ``q`` to channel pairs (one int32 per pair, as ``vpmaddwd`` takes them)
    with the padding filled with the zero point ``zp`` (where the float input is 0), so the
    integer sum over the padded window is exact and the zero-point correction a per-output
    constant (in ``offset``). Then per output row and tile of ``lanes`` (8 or 16) channels, ``wt``
    output pixels accumulate in int32 registers, one ``vpmaddwd`` per 8 channels per tap and pair."""
    from tvm.script import tirx as T

    n, c, h, wd = shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, wd + pl + pr
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cp = (c + 1) // 2
    vg = lanes // 8  # int32x8 vectors per tile
    wt = next(d for d in (6, 5, 4, 3, 2, 1) if wo % d == 0 and d * vg <= 12)
    loop = T.parallel if n * ho * wo * k * c * kh * kw >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qconv2d(q: T.Buffer((n, h, wd, c), qdtype), w: T.Buffer((k // lanes, kh, kw, cp, lanes * 2), "int16"), scale: T.Buffer((k,), "float32"),
                offset: T.Buffer((k,), "float32"), y: T.Buffer((n, ho, wo, k), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_conv2d"})
        pairs = T.alloc_buffer((n, hp, wp, cp), "int32")
        for b_h in loop(n * hp):
            for x_w, p in T.grid(wp, cp):
                pairs[b_h // hp, b_h % hp, x_w, p] = T.bitwise_or(
                    T.bitwise_and(T.if_then_else(
                        b_h % hp >= pt and b_h % hp < pt + h and x_w >= pl and x_w < pl + wd,
                        T.Cast("int32", q[b_h // hp, b_h % hp - pt, x_w - pl, p * 2]), zp), 65535),
                    T.shift_left(T.if_then_else(
                        p * 2 + 1 >= c, 0, T.if_then_else(
                            b_h % hp >= pt and b_h % hp < pt + h and x_w >= pl and x_w < pl + wd,
                            T.Cast("int32", q[b_h // hp, b_h % hp - pt, x_w - pl, p * 2 + 1]), zp)), 16))
        for fused in loop(k // lanes * n * ho):
            acc = T.alloc_buffer((wt, lanes), "int32", scope="local")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(lanes):
                        acc[t, j] = 0
                for rh, rw, p in T.grid(kh, kw, cp):
                    for t in T.unroll(wt):
                        for g in T.unroll(vg):
                            acc[t, T.Ramp(g * 8, 1, 8)] = acc[t, T.Ramp(g * 8, 1, 8)] + T.call_llvm_pure_intrin(
                                "int32x8", "llvm.x86.avx2.pmadd.wd",
                                T.reinterpret("int16x16", T.Broadcast(pairs[
                                    fused % (n * ho) // ho, fused % ho * sh + rh, (wo_o * wt + t) * sw + rw, p], 8)),
                                w[fused // (n * ho), rh, rw, p, T.Ramp(g * 16, 1, 16)])
                for t in T.unroll(wt):
                    for j in T.vectorized(lanes):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * lanes + j] = (
                            T.Cast("float32", acc[t, j]) * scale[fused // (n * ho) * lanes + j]
                            + offset[fused // (n * ho) * lanes + j])

    return qconv2d


def pack_conv_weights_vnni(w: np.ndarray, tile: int) -> np.ndarray:
    """int8 OIHW ``w`` [K, C, KH, KW] -> int8 [K/tile, KH, KW, ceil(C/4), tile*4]: per tile of
    outputs and per tap, each output's weights for a quad of input channels (zeros past C)."""
    k, c, kh, kw = w.shape
    cq = _quads(c)
    padded = np.zeros((k, cq * 4, kh, kw), np.int8)
    padded[:, :c] = w
    tiles = padded.reshape(k // tile, tile, cq, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3)
    return np.ascontiguousarray(tiles).reshape(k // tile, kh, kw, cq, tile * 4)


def vnni_conv_tile(k: int) -> tuple[int, int]:
    """(int32 lanes per vector: 16 (zmm) or 8 (ymm), vectors per tile) for ``k`` output channels."""
    if k % 16 == 0:
        return 16, 2 if k % 32 == 0 else 1
    return 8, 1


def qconv2d_vnni_func(shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                      pads: tuple[int, int, int, int], k: int, zp: int, qdtype: str = "uint8") -> Any:
    """AVX-512 VNNI int8 direct convolution: PrimFunc ``(q[N, H, W, C] qdtype, w[K/T, KH, KW,
    ceil(C/4), T*4] int8, scale[K], offset[K], y[N, Ho, Wo, K] float32)``, ``T`` from
    :func:`vnni_conv_tile`; as :func:`qconv2d_func` with channel quads instead of pairs (int8
    activations read as uint8 ``q + 128``: the caller's offset uses the zero point plus 128)."""
    from tvm.script import tirx as T

    n, c, h, wd = shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, wd + pl + pr
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cq = _quads(c)
    lanes, g = vnni_conv_tile(k)
    tile = lanes * g
    flip = 128 if qdtype == "int8" else 0
    pad = (zp + flip) & 255
    wt = next(d for d in range(min(wo, 12 if g == 1 else 8), 0, -1) if wo % d == 0)
    intrin, acc_t, byte_t = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}", f"int32x{lanes}", f"int8x{lanes * 4}"
    loop = T.parallel if n * ho * wo * k * c * kh * kw >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qconv2d_vnni(q: T.Buffer((n, h, wd, c), qdtype), w: T.Buffer((k // tile, kh, kw, cq, tile * 4), "int8"),
                     scale: T.Buffer((k,), "float32"), offset: T.Buffer((k,), "float32"),
                     y: T.Buffer((n, ho, wo, k), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_conv2d"})
        quads = T.alloc_buffer((n, hp, wp, cq), "int32")
        for b_h in loop(n * hp):
            for x_w, p in T.grid(wp, cq):
                quads[b_h // hp, b_h % hp, x_w, p] = 0
                for b in T.unroll(4):
                    quads[b_h // hp, b_h % hp, x_w, p] = quads[b_h // hp, b_h % hp, x_w, p] + T.shift_left(
                        T.if_then_else(p * 4 + b >= c, 0, T.if_then_else(
                            b_h % hp >= pt and b_h % hp < pt + h and x_w >= pl and x_w < pl + wd,
                            T.bitwise_xor(T.bitwise_and(T.Cast("int32", q[b_h // hp, b_h % hp - pt, x_w - pl, p * 4 + b]),
                                                        255), flip), pad)), b * 8)
        for fused in loop(k // tile * n * ho):
            acc = T.alloc_buffer((wt, tile), "int32", scope="local")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(tile):
                        acc[t, j] = 0
                for rh, rw, p in T.grid(kh, kw, cq):
                    for t in T.unroll(wt):
                        for v in T.unroll(g):
                            acc[t, T.Ramp(v * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                                acc_t, intrin, acc[t, T.Ramp(v * lanes, 1, lanes)],
                                T.reinterpret(byte_t, T.Broadcast(quads[
                                    fused % (n * ho) // ho, fused % ho * sh + rh, (wo_o * wt + t) * sw + rw, p], lanes)),
                                w[fused // (n * ho), rh, rw, p, T.Ramp(v * lanes * 4, 1, lanes * 4)])
                for t in T.unroll(wt):
                    for j in T.vectorized(tile):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * tile + j] = (
                            T.Cast("float32", acc[t, j]) * scale[fused // (n * ho) * tile + j]
                            + offset[fused // (n * ho) * tile + j])

    return qconv2d_vnni


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
    """Run ``build(self, call, operands) -> new expr | None`` on every ``relax.<op>`` call whose
    operands match :func:`_qdq_contraction`. x86 targets with AVX2 (or AVX-512) only."""
    import tvm
    from tvm import relax

    if spec.get("kind") != "llvm" or spec.get("mtriple", "").startswith("aarch64"):
        return mod, False
    from graphslim.kernels.schedules import vector_bits

    if vector_bits(tvm.target.Target(spec)) < 256:
        return mod, False
    ops = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "dequantize", "permute_dims")}
    target_op = tvm.ir.Op.get(f"relax.{op}")
    changed: list[str] = []

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def bound(self, expr: Any) -> Any:
            return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != target_op:
                return call
            try:
                operands = _qdq_contraction(call, self.bound, ops)
                new = None if operands is None else build(self, call, *operands)
            except (AttributeError, TypeError, ValueError):  # not the pattern
                new = None
            if new is None:
                return call
            changed.append(op)
            return new

    from graphslim.kernels.pipeline import visit_relax_functions

    new = visit_relax_functions(Rewriter(mod), mod)
    if not changed:
        return mod, False
    return relax.transform.DeadCodeElimination()(new), True


def _scale_offset(s_x: np.ndarray, zp_x: np.ndarray, s_w: np.ndarray, wsum: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-output float scale ``s_x * s_w[n]`` and offset ``-scale * zp_x * sum_k W[n, k]``."""
    n = wsum.shape[0]
    scale = (float(s_x.reshape(())) * np.broadcast_to(s_w.reshape(-1), (n,))).astype(np.float32)
    offset = (-scale.astype(np.float64) * float(zp_x.reshape(())) * wsum).astype(np.float32)
    return scale, offset


def rewrite_int8_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-dense"]``, run on the module as imported,
    before constants fold): ``matmul(dequantize(q), [permute_dims](dequantize(W_int8)))`` ->
    :func:`qdense_func`. x86 targets with AVX2 (or AVX-512) only."""
    from tvm import relax

    def build(self: Any, call: Any, q: Any, s_x: Any, zp_x: Any, w: Any, s_w: Any, axis: int, transposed: bool) -> Any:
        xs = [int(d) for d in q.ty.shape]
        if w.ndim != 2 or len(xs) != 2:
            return None
        # W as [N, K] (outputs x inputs) and the weight scale per output
        if transposed:  # Gemm transB: W is [N, K], per-channel on axis 0
            wn, per_out = w, axis == 0
        else:  # MatMul: W is [K, N], per-channel on axis 1
            wn, per_out = w.T, axis == 1
        n, k = wn.shape
        qdtype = str(q.ty.dtype)
        if s_w.size not in (1, n) or (s_w.size == n and not per_out) or n % NB or xs[1] != k:
            return None
        if vnni:
            zp = zp_x.astype(np.int64) + (128 if qdtype == "int8" else 0)  # the kernel reads int8 as uint8 q + 128
            func, packed = qdense_vnni_func(xs[0], k, n, qdtype), pack_weights_vnni(wn, 16 * _vnni_dense_tile(xs[0], n)[1])
        elif k % 2 == 0:
            zp, func, packed = zp_x, qdense_func(xs[0], k, n, qdtype), pack_weights(wn)
        else:
            return None
        scale, offset = _scale_offset(s_x, zp, s_w, wn.astype(np.int64).sum(axis=1))
        gv = self.builder_.add_func(func, "int8_dense_vnni" if vnni else "int8_dense")
        return relax.call_tir(gv, [q, relax.const(packed), relax.const(scale), relax.const(offset)],
                              relax.TensorType((xs[0], n), "float32"))

    import tvm

    vnni = has_vnni(tvm.target.Target(spec)) if spec.get("kind") == "llvm" else False
    return _int8_rewrite(mod, spec, "matmul", build)


def rewrite_int8_conv(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-conv"]``, on the module as imported):
    NCHW ``conv2d(dequantize(q), dequantize(W_int8))`` (groups 1, no dilation, output channels a
    multiple of 8, per-tensor or per-output-channel weight scale) -> :func:`qconv2d_func` between
    two ``permute_dims`` (NCHW -> NHWC -> NCHW); the CPU pipeline moves them down through the
    elementwise QDQ ops that follow, so between two such layers they cancel. x86 targets with
    AVX2 (or AVX-512) only."""
    from tvm import relax

    def build(self: Any, call: Any, q: Any, s_x: Any, zp_x: Any, w: Any, s_w: Any, axis: int, transposed: bool) -> Any:
        a = call.attrs
        if transposed or w.ndim != 4 or (a.data_layout, a.kernel_layout, a.out_layout or "NCHW") != (
                "NCHW", "OIHW", "NCHW"):
            return None
        if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation):
            return None
        xs = [int(d) for d in q.ty.shape]
        k = w.shape[0]
        if len(xs) != 4 or xs[1] != w.shape[1] or k % 8 or s_w.size not in (1, k) or (s_w.size == k and axis != 0):
            return None
        qdtype, zp = str(q.ty.dtype), int(zp_x.reshape(()))
        pads = tuple(int(p) for p in a.padding)  # top, left, bottom, right
        geometry = (tuple(xs), (w.shape[2], w.shape[3]), tuple(int(s) for s in a.strides), pads, k)
        if vnni:
            lanes, g = vnni_conv_tile(k)
            func, packed = qconv2d_vnni_func(*geometry, zp, qdtype), pack_conv_weights_vnni(w, lanes * g)
            zp += 128 if qdtype == "int8" else 0  # the kernel reads int8 as uint8 q + 128
        else:
            lanes = 16 if k % 16 == 0 else 8
            func, packed = qconv2d_func(*geometry, lanes, zp, qdtype), pack_conv_weights(w, lanes)
        scale, offset = _scale_offset(s_x, np.asarray(zp), s_w, w.reshape(k, -1).astype(np.int64).sum(axis=1))
        gv = self.builder_.add_func(func, "int8_conv2d_vnni" if vnni else "int8_conv2d")
        out = [int(d) for d in call.ty.shape]  # N, K, Ho, Wo
        # NHWC in and out; the pipeline's transpose sinking cancels these between layers
        q_nhwc = self.builder_.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
        nhwc = self.builder_.emit(relax.call_tir(
            gv, [q_nhwc, relax.const(packed), relax.const(scale), relax.const(offset)],
            relax.TensorType((out[0], out[2], out[3], k), "float32")))
        return relax.op.permute_dims(nhwc, [0, 3, 1, 2])

    import tvm

    vnni = has_vnni(tvm.target.Target(spec)) if spec.get("kind") == "llvm" else False
    return _int8_rewrite(mod, spec, "nn.conv2d", build)


rewrite_int8_dense.stage = "import"  # type: ignore[attr-defined] - needs the int8 constants unfolded
rewrite_int8_conv.stage = "import"  # type: ignore[attr-defined]
