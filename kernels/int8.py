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

__all__ = ["pack_weights", "qdense_func", "rewrite_int8_dense"]

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

    @T.prim_func(private=True, s_tir=True)
    def qdense(q: T.Buffer((m, k), qdtype), w: T.Buffer((n // NB, kp, NB * 2), "int16"),
               scale: T.Buffer((n,), "float32"), offset: T.Buffer((n,), "float32"),
               y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "int8_dense"})
        # activation pairs packed once per call as int32 (two int16 halves), broadcast below
        pairs = T.alloc_buffer((m, kp), "int32")
        for i in T.parallel(m):
            for p in range(kp):
                pairs[i, p] = T.bitwise_or(T.bitwise_and(T.Cast("int32", q[i, p * 2]), 65535),
                                           T.shift_left(T.Cast("int32", q[i, p * 2 + 1]), 16))
        for jo in T.parallel(n // NB):
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


def _const(expr: Any) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def rewrite_int8_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["int8-dense"]``, run on the module as imported,
    before constants fold): ``matmul(dequantize(q), [permute_dims](dequantize(W_int8)))`` ->
    :func:`qdense_func`. x86 targets with AVX2 (or AVX-512) only."""
    import tvm
    from tvm import relax

    if spec.get("kind") != "llvm" or spec.get("mtriple", "").startswith("aarch64"):
        return mod, False
    from graphslim.kernels.schedules import vector_bits

    if vector_bits(tvm.target.Target(spec)) < 256:
        return mod, False
    ops = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "dequantize", "permute_dims")}
    changed: list[str] = []

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def bound(self, expr: Any) -> Any:
            return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != ops["matmul"]:
                return call
            try:
                new = self._rewrite(call)
            except (AttributeError, TypeError, ValueError):  # not the pattern
                new = None
            return call if new is None else new

        def _rewrite(self, call: Any) -> Any:
            a, b = self.bound(call.args[0]), self.bound(call.args[1])
            if not (isinstance(a, relax.Call) and a.op == ops["dequantize"]):
                return None
            transposed = isinstance(b, relax.Call) and b.op == ops["permute_dims"]
            if transposed:
                axes = [int(x) for x in b.attrs.axes]
                if axes != [1, 0]:
                    return None
                b = self.bound(b.args[0])
            if not (isinstance(b, relax.Call) and b.op == ops["dequantize"]):
                return None
            w, s_w, zp_w = (_const(e) for e in b.args)
            s_x, zp_x = _const(a.args[1]), _const(a.args[2])
            q = a.args[0]
            if any(v is None for v in (w, s_w, zp_w, s_x, zp_x)) or w.dtype != np.int8 or w.ndim != 2:
                return None
            qdtype = str(q.ty.dtype)
            if qdtype not in ("uint8", "int8") or s_x.size != 1 or zp_x.size != 1 or np.any(zp_w):
                return None
            xs = [int(d) for d in q.ty.shape]
            if len(xs) != 2:
                return None
            # W as [N, K] (outputs x inputs) and the weight scale per output
            axis = int(b.attrs.axis) % 2
            if transposed:  # Gemm transB: W is [N, K], per-channel on axis 0
                wn, per_out = w, axis == 0
            else:  # MatMul: W is [K, N], per-channel on axis 1
                wn, per_out = w.T, axis == 1
            n, k = wn.shape
            if s_w.size not in (1, n) or (s_w.size == n and not per_out) or n % NB or k % 2 or xs[1] != k:
                return None
            scale = (float(s_x.reshape(())) * np.broadcast_to(s_w.reshape(-1), (n,))).astype(np.float32)
            wsum = wn.astype(np.int64).sum(axis=1)
            offset = (-scale.astype(np.float64) * float(zp_x.reshape(())) * wsum).astype(np.float32)
            gv = self.builder_.add_func(qdense_func(xs[0], k, n, qdtype), "int8_dense")
            changed.append(gv.name_hint)
            return relax.call_tir(gv, [q, relax.const(pack_weights(wn)), relax.const(scale), relax.const(offset)],
                                  relax.TensorType((xs[0], n), "float32"))

    from graphslim.kernels.pipeline import visit_relax_functions

    new = visit_relax_functions(Rewriter(mod), mod)
    if not changed:
        return mod, False
    return relax.transform.DeadCodeElimination()(new), True


rewrite_int8_dense.stage = "import"  # type: ignore[attr-defined] - needs the int8 constants unfolded
