"""Block-sparse (BSR) dense kernel and the Relax rewrite that uses it.

``Y[m, n] = sum_k X[m, k] * W[n, k]`` (plus the model's bias, added by the ops that follow), with
``W`` ([outputs, inputs], the layout of ``sparsify-blocks``) stored in block-compressed-row form
with ``br x bc`` blocks (``br`` outputs by ``bc`` inputs): ``indptr`` [N/br + 1] (int32),
``indices`` [nnzb] (block column), ``data`` [nnzb, bc, br] (a block's ``br`` outputs innermost,
so they load as one SIMD vector). The weights are compile-time constants.

The kernel is written directly as a scheduled TIR loop nest (TVMScript): parallel over block
rows, an accumulator of ``br`` outputs per row of ``X`` kept in registers, the inner ``br`` loop
vectorized; only the stored blocks are visited, so its work is ``(1 - sparsity)`` of the dense
product. TVM 0.27 has no sparse ops (Relay's were removed) and MetaSchedule cannot tune
data-dependent loops, hence a hand-written kernel (it carries ``tirx.is_scheduled``).

The rewrite replaces ``relax.matmul(x, W)`` with a constant 2-D ``W`` whose block sparsity is at
least ``threshold`` (default 0.6) for one of the 16x1, 4x4 and 1x4 blockings (the cheapest by
:func:`choose_block`), by a
``call_tir`` of this kernel. Everything else stays on the dense path, so a model the rewrite
does not recognise is compiled exactly as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphslim.analysis.sparsity import block_sparsity

__all__ = ["BLOCKS", "bsr_dense_func", "choose_block", "rewrite_bsr_dense", "to_bsr"]

#: Candidate blockings, (outputs, inputs) per block, fastest first on SIMD CPUs.
BLOCKS: tuple[tuple[int, int], ...] = ((16, 1), (4, 4), (1, 4))
DEFAULT_THRESHOLD = 0.6


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` [N, K] (N and K multiples of the block) -> (data [nnzb, bc, br], indices, indptr)."""
    br, bc = block
    n, k = w.shape
    if n % br or k % bc:
        raise ValueError(f"weight {list(w.shape)} is not a whole number of {br}x{bc} blocks")
    tiles = w.reshape(n // br, br, k // bc, bc).transpose(0, 2, 3, 1)  # [N/br, K/bc, bc, br]
    nonzero = np.abs(tiles).reshape(n // br, k // bc, -1).max(axis=2) > 0
    rows, cols = np.nonzero(nonzero)
    data = np.ascontiguousarray(tiles[rows, cols])
    indptr = np.zeros(n // br + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n // br), out=indptr[1:])
    return data.astype(w.dtype), cols.astype(np.int32), indptr


#: Relative time per stored weight of each blocking in :func:`bsr_dense_func`, measured on this
#: project's AVX2 machine (1024x1024, 90% block sparsity: 16x1 0.015 / 4x4 0.052 / 1x4 0.18 ms at
#: batch 1; 0.12 / 0.33 / 1.18 ms at batch 32): 16x1 loads a whole output vector per input, 1x4
#: is scalar.
BLOCK_COST = {(16, 1): 1.0, (4, 4): 3.0, (1, 4): 10.0}


def choose_block(w: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> tuple[tuple[int, int], float] | None:
    """The blocking to use for ``w`` [N, K]: among :data:`BLOCKS` that tile it exactly and whose
    block sparsity reaches ``threshold``, the one with the least estimated time
    ``(1 - sparsity) * BLOCK_COST``; None when none qualifies (the layer stays dense)."""
    best = None
    for block in BLOCKS:
        if w.shape[0] % block[0] or w.shape[1] % block[1]:
            continue
        s = block_sparsity(w, block)
        if s < threshold:
            continue
        cost = (1.0 - s) * BLOCK_COST[block]
        if best is None or cost < best[0]:
            best = (cost, block, s)
    return (best[1], best[2]) if best else None


def bsr_dense_func(m: int, k: int, n: int, block: tuple[int, int], nnzb: int, dtype: str = "float32") -> Any:
    """The kernel as a PrimFunc ``(x[m,k], data, indices, indptr, y[m,n])``."""
    from tvm.script import tirx as T

    br, bc = block
    nb = n // br
    nnz = max(nnzb, 1)
    rt = next(d for d in (4, 3, 2, 1) if m % d == 0)  # rows of X per pass over a block row

    @T.prim_func(private=True, s_tir=True)
    def bsr_dense(x: T.Buffer((m, k), dtype), data: T.Buffer((nnz, bc, br), dtype),
                  indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                  y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "bsr_dense"})
        for io in T.parallel(nb):
            acc = T.alloc_buffer((rt, br), dtype, scope="local")
            for ro in range(m // rt):
                for r in T.unroll(rt):
                    for j in T.vectorized(br):
                        acc[r, j] = T.cast(0, dtype)
                for p in range(indptr[io], indptr[io + 1]):
                    for c in T.unroll(bc):
                        for r in T.unroll(rt):
                            for j in T.vectorized(br):
                                acc[r, j] = acc[r, j] + x[ro * rt + r, indices[p] * bc + c] * data[p, c, j]
                for r in T.unroll(rt):
                    for j in T.vectorized(br):
                        y[ro * rt + r, io * br + j] = acc[r, j]

    return bsr_dense


def rewrite_bsr_dense(mod: Any, spec: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["bsr-dense"]``): block-sparse constant weights
    of ``relax.matmul`` to :func:`bsr_dense_func` calls. CPU targets only."""
    if spec.get("kind") != "llvm":
        return mod, False
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    mod = relax.transform.FoldConstant()(mod)  # permute_dims(W) of a Gemm folds into W^T
    matmul = tvm.ir.Op.get("relax.matmul")
    changed = []

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != matmul or not isinstance(call.args[1], Constant):
                return call
            x = call.args[0]
            xs, ws = x.ty, call.args[1].ty
            if len(getattr(xs, "shape", None) or []) != 2 or len(ws.shape) != 2:
                return call
            try:
                m, k = (int(d) for d in xs.shape)
            except (TypeError, ValueError):
                return call
            w = call.args[1].value.numpy()
            if w.dtype != np.float32 or str(xs.dtype) != "float32":
                return call
            wt = np.ascontiguousarray(w.T)  # [N, K]: outputs x inputs
            chosen = choose_block(wt, threshold)
            if chosen is None:
                return call
            block, _ = chosen
            data, indices, indptr = to_bsr(wt, block)
            if len(indices) == 0:
                data = np.zeros((1, block[1], block[0]), np.float32)
                indices = np.zeros(1, np.int32)
            func = bsr_dense_func(m, k, wt.shape[0], block, len(indices))
            gv = self.builder_.add_func(func, f"bsr_dense_{block[0]}x{block[1]}")
            changed.append(block)
            return relax.call_tir(gv, [x, relax.const(data), relax.const(indices), relax.const(indptr)],
                                  relax.TensorType((m, wt.shape[0]), "float32"))

    rewriter = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    new = rewriter.builder_.get()
    return (new, True) if changed else (mod, False)
