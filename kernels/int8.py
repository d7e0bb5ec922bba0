"""int8 dense kernel for QDQ MatMul/Gemm, and the Relax rewrite that uses it (x86 AVX2 and up).

ONNX QDQ models (``quantize-int8``, or onnxruntime.quantization) import into Relax as
``matmul(dequantize(q), dequantize(W_int8))``: float math, so an int8 model runs no faster than
fp32. This rewrite computes such a layer on the integers instead:

    y[m, n] = s_x * s_w[n] * (sum_k q[m, k] * W[n, k] - zp_x * sum_k W[n, k])

with ``q`` the uint8/int8 activations, ``W`` the int8 weights (symmetric: zero points 0), int32
accumulation (exact), and the scale/offset applied per output in float. The inner product uses
AVX2's ``vpmaddwd`` (``llvm.x86.avx2.pmadd.wd``: 16 int16 products summed pairwise into 8 int32
lanes per instruction, twice the multiply-adds of an fp32 FMA), on pairs of activations packed
into one int32 and broadcast, against weights packed at compile time as ``[N/16, K/2, 16*2]``
int16. The result is exact where ORT's float QDQ math is not, so outputs agree with ORT up to a
float rounding that can move a later requantization by one step.

Only for LLVM x86 targets with AVX2; per-tensor activation scale and zero point, per-tensor or
per-output-channel weight scale, zero weight zero points, N a multiple of 16, K even. Other
layers stay on the dense float path (correct, not faster). No VNNI (``vpdpbusd``) variant yet:
this project's machines have AVX2 only, so it could not be measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

__all__ = ["pack_conv_weights", "pack_weights", "qconv2d_func", "qdense_func", "rewrite_int8_conv",
           "rewrite_int8_dense"]

NB = 16  # outputs per tile: two AVX2 int32 vectors


def pack_weights(w: np.ndarray) -> np.ndarray:
    """int8 ``w`` [N, K] -> int16 [N/16, K/2, 32]: for each tile and input pair, the 16 outputs'
    (w[n, 2p], w[n, 2p+1]) pairs, as ``vpmaddwd`` consumes them."""
    n, k = w.shape
    return np.ascontiguousarray(w.astype(np.int16).reshape(n // NB, NB, k // 2, 2).transpose(0, 2, 1, 3)
                                ).reshape(n // NB, k // 2, NB * 2)


def qdense_func(m: int, k: int, n: int, qdtype: str = "uint8") -> Any:
    """PrimFunc ``(q[m,k] qdtype, w[n/16, k/2, 32] int16, scale[n], offset[n], y[m,n] float32)``."""
    from tvm.script import tirx as T

    kp = k // 2
    rt = next(d for d in (4, 3, 2, 1) if m % d == 0)
    loop = T.parallel if m * k * n >= PARALLEL_MIN_MACS else T.serial  # see schedules.py

    @T.prim_func(private=True, s_tir=True)
    def qdense(q: T.Buffer((m, k), qdtype), w: T.Buffer((n // NB, kp, NB * 2), "int16"),
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
                                w[jo, p, T.Ramp(g * 16, 1, 16)])
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
        if s_w.size not in (1, n) or (s_w.size == n and not per_out) or n % NB or k % 2 or xs[1] != k:
            return None
        scale, offset = _scale_offset(s_x, zp_x, s_w, wn.astype(np.int64).sum(axis=1))
        gv = self.builder_.add_func(qdense_func(xs[0], k, n, str(q.ty.dtype)), "int8_dense")
        return relax.call_tir(gv, [q, relax.const(pack_weights(wn)), relax.const(scale), relax.const(offset)],
                              relax.TensorType((xs[0], n), "float32"))

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
        lanes = 16 if k % 16 == 0 else 8
        scale, offset = _scale_offset(s_x, zp_x, s_w, w.reshape(k, -1).astype(np.int64).sum(axis=1))
        pads = tuple(int(p) for p in a.padding)  # top, left, bottom, right
        func = qconv2d_func(tuple(xs), (w.shape[2], w.shape[3]), tuple(int(s) for s in a.strides), pads, k, lanes,
                            int(zp_x.reshape(())), str(q.ty.dtype))
        gv = self.builder_.add_func(func, "int8_conv2d")
        out = [int(d) for d in call.ty.shape]  # N, K, Ho, Wo
        # NHWC in and out; the pipeline's transpose sinking cancels these between layers
        q_nhwc = self.builder_.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
        nhwc = self.builder_.emit(relax.call_tir(
            gv, [q_nhwc, relax.const(pack_conv_weights(w, lanes)), relax.const(scale), relax.const(offset)],
            relax.TensorType((out[0], out[2], out[3], k), "float32")))
        return relax.op.permute_dims(nhwc, [0, 3, 1, 2])

    return _int8_rewrite(mod, spec, "nn.conv2d", build)


rewrite_int8_dense.stage = "import"  # type: ignore[attr-defined] - needs the int8 constants unfolded
rewrite_int8_conv.stage = "import"  # type: ignore[attr-defined]
