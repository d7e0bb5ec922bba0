"""fp32 matmuls with constant weights on packed weight panels (the dense path's GEMM).

A constant weight ``W`` [K, N] read column-tile by column-tile is a strided stream: each row of a
16-column tile is 64 bytes out of an ``N * 4``-byte row, so a weight larger than L2 (a
transformer's FFN layers: 256 x 1024 x 4 B = 1 MiB) is re-fetched from memory for every tile of
rows. This rewrite stores it as panels ``Wp[N / P, K, P]`` (``P`` outputs contiguous per input,
what MLAS and oneDNN do with constant weights) and computes

    y[m, n] = sum_k x[m, k] * Wp[n // P, k, n % P]

as a TE compute, so TVM's fusion still merges the epilogue that follows (bias, Gelu, residual
add: ``fused_matmul_add_..._multiply``), and :class:`graphslim.kernels.schedules.ContractionCPU`
schedules the fused kernel (vector tile dividing ``P``, a register tile of rows, the epilogue on
each finished tile). Measured here (AMD EPYC, AVX2, one thread, best of 60 runs): 128x256x1024
26.7 -> 45 GMAC/s, 2048x256x1024 10.8 -> 40 GMAC/s.

Matched: ``relax.matmul(x, W)``, ``x`` float32 [..., K] with static shape and at least 2 rows
(a GEMV reads each weight once: the layout does not matter there), ``W`` a float32 constant
[K, N] with N a multiple of 8; ``x`` of any rank ([batch, sequence, K] in a transformer: the
schedule tiles the sequence axis in registers and runs the batch in parallel). The
compression-aware rewrites run first and take the layers they handle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pack_panels", "packed_dense_func", "packed_dense_te", "panel_width", "rewrite_packed_dense"]


def panel_width(n: int, lanes: int) -> int | None:
    """Outputs per panel: two SIMD vectors (16 fp32 on AVX2 / NEON x4, 32 on AVX-512) where ``n``
    allows, else one vector or 8; None when ``n`` is not a multiple of 8."""
    for p in (2 * lanes, lanes, 8):
        if n % p == 0:
            return p
    return None


def pack_panels(w: np.ndarray, p: int) -> np.ndarray:
    """``w`` [K, N] -> [N / p, K, p]: panel ``j`` holds outputs ``j*p .. j*p+p-1`` of every input."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // p, p).transpose(1, 0, 2))


def packed_dense_te(x: Any, wp: Any) -> Any:
    """TE: ``x`` [*lead, k] times the weight packed as ``wp`` [n/p, k, p] -> [*lead, n] (unscheduled:
    the CPU pipeline fuses and schedules it; the leading axes stay as they are, so the epilogue
    TVM fuses needs no reshape in between)."""
    from tvm import te

    *lead, k = x.shape
    panels, _, p = (int(d) for d in wp.shape)
    r = te.reduce_axis((0, k), name="k")
    return te.compute(
        (*lead, panels * p),
        lambda *i: te.sum(x[(*i[:-1], r)] * wp[i[-1] // p, r, i[-1] % p], axis=r),
        name="packed_matmul",
    )


def packed_dense_func(shape: tuple[int, ...], n: int, p: int, dtype: str = "float32") -> Any:
    """:func:`packed_dense_te` as a PrimFunc ``(x[*shape], wp[n/p, k, p], y[*shape[:-1], n])``."""
    from tvm import te

    x = te.placeholder(tuple(shape), dtype, name="x")
    wp = te.placeholder((n // p, shape[-1], p), dtype, name="wp")
    return te.create_prim_func([x, wp, packed_dense_te(x, wp)])


def rewrite_packed_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["packed-dense"]``, CPU targets, after the
    compression-aware rewrites): ``matmul(x, W)`` with a constant fp32 ``W`` -> a ``call_tir`` of
    :func:`packed_dense_func` on :func:`pack_panels` of ``W`` (see the module docstring)."""
    if spec.get("kind") != "llvm":
        return mod, False
    import tvm
    from graphslim.kernels.pipeline import visit_relax_functions
    from graphslim.kernels.schedules import vector_lanes
    from tvm import relax
    from tvm.ir.expr import Constant

    lanes = vector_lanes(tvm.target.Target(spec))
    matmul = tvm.ir.Op.get("relax.matmul")
    changed = [0]

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != matmul or not isinstance(call.args[1], Constant):
                return call
            x = call.args[0]
            try:
                xs = [int(d) for d in x.ty.shape]
            except (AttributeError, TypeError, ValueError):
                return call
            w = call.args[1].value.numpy()
            if str(x.ty.dtype) != "float32" or w.dtype != np.float32 or w.ndim != 2 or len(xs) < 2:
                return call
            k, n = w.shape
            m = int(np.prod(xs[:-1]))
            p = panel_width(n, lanes)
            if xs[-1] != k or m < 2 or p is None:
                return call
            changed[0] += 1
            return self.builder_.call_te(
                packed_dense_te, x, relax.const(pack_panels(w, p)), primfunc_name_hint="packed_matmul"
            )

    new = visit_relax_functions(Rewriter(mod), mod)
    if not changed[0]:
        return mod, False
    return relax.transform.DeadCodeElimination()(new), True
