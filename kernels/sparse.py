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

import functools
from typing import Any

import numpy as np
from graphslim.kernels.schedules import PARALLEL_MIN_MACS

from graphslim.analysis.sparsity import block_sparsity

__all__ = [
    "BLOCKS",
    "BLOCK_COST",
    "BLOCK_COST_ROWS",
    "bsr_conv2d_func",
    "bsr_dense_func",
    "choose_block",
    "conv_offsets",
    "rewrite_bsr_dense",
    "to_bsr",
]

#: Candidate blockings, (outputs, inputs) per block, fastest first on SIMD CPUs.
BLOCKS: tuple[tuple[int, int], ...] = ((16, 1), (4, 4), (1, 4))
DEFAULT_THRESHOLD = 0.6
#: Blockings the conv kernel takes. 4x4 and 1x4 blocks vectorize over 4 outputs or inputs only and
#: pay the block loop per tile of output pixels: on the pruned ResNet-style net's 8-channel
#: convs at 90% block sparsity, 4x4 BSR took 15-20 us per layer against 4-5 us dense, so those
#: layers stay dense.
CONV_BLOCKS: tuple[tuple[int, int], ...] = ((16, 1),)


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
#: project's AVX2 machine (1024x1024, 90% block sparsity, thread CPU time: 16x1 0.017 / 4x4 0.033
#: / 1x4 0.036 ms at batch 1; 0.17 / 0.47 / 0.33 ms at batch 32): 16x1 loads a whole output
#: vector per input; 1x4 blocks on whole vectors of rows vectorize over the rows
#: (:data:`BLOCK_COST_ROWS`), otherwise over their 4 inputs (half a vector).
BLOCK_COST = {(16, 1): 1.0, (4, 4): 3.0, (1, 4): 4.0}
BLOCK_COST_ROWS = {**BLOCK_COST, (1, 4): 2.0}


def choose_block(
    w: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    blocks: tuple[tuple[int, int], ...] = BLOCKS,
    rows_vectorized: bool = False,
) -> tuple[tuple[int, int], float] | None:
    """The blocking to use for ``w`` [N, K]: among :data:`BLOCKS` that tile it exactly and whose
    block sparsity reaches ``threshold``, the one with the least estimated time
    ``(1 - sparsity) * BLOCK_COST`` (:data:`BLOCK_COST_ROWS` when the product has whole vectors
    of rows); None when none qualifies (the layer stays dense)."""
    costs = BLOCK_COST_ROWS if rows_vectorized else BLOCK_COST
    best = None
    for block in blocks:
        if w.shape[0] % block[0] or w.shape[1] % block[1]:
            continue
        s = block_sparsity(w, block)
        if s < threshold:
            continue
        cost = (1.0 - s) * costs[block]
        if best is None or cost < best[0]:
            best = (cost, block, s)
    return (best[1], best[2]) if best else None


def bsr_dense_func(
    m: int,
    k: int,
    n: int,
    block: tuple[int, int],
    nnzb: int,
    dtype: str = "float32",
    relu: bool = False,
    lanes: int = 8,
) -> Any:
    """The kernel as a PrimFunc ``(x[m,k], data, indices, indptr, bias[n], y[m,n])``: the
    model's bias (zeros when it has none) and, with ``relu``, a ReLU are applied to each
    finished tile (the epilogue the rewrite absorbs). ``lanes``: fp32 SIMD lanes of the target
    (1xK blocks on a multiple of ``lanes`` rows vectorize over rows)."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38  # ReLU as max(v, lo); -3.4e38 (float32 lowest) leaves v as it is

    br, bc = block
    nb = n // br
    nnz = max(nnzb, 1)
    rt = next(d for d in (4, 3, 2, 1) if m % d == 0)  # rows of X per pass over a block row
    loop = T.parallel if m * nnz * br * bc >= PARALLEL_MIN_MACS else T.serial  # see schedules.py
    if br == 1 and m % lanes == 0 and m >= lanes:
        # One output per block and whole vectors of rows: vectorize over the rows instead (x
        # transposed once per call, so a block's input columns are contiguous rows of x^T), a
        # register tile of up to 4 row vectors per output: one broadcast weight and 4 FMAs per
        # block column, at the FMA rate of the dense kernel.
        return _bsr_dense_rows(m, k, n, bc, nnz, lanes, dtype, lo, loop)
    if br == 1:
        # One output per block: vectorize over the block's bc contiguous inputs instead, and
        # sum the lanes at the end (1x4 blocks: one 4-lane FMA per block instead of 4 scalar).
        return _bsr_dense_inputs(m, k, n, bc, nnz, rt, dtype, lo, loop)

    @T.prim_func(private=True, s_tir=True)
    def bsr_dense(
        x: T.Buffer((m, k), dtype),
        data: T.Buffer((nnz, bc, br), dtype),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), dtype),
        y: T.Buffer((m, n), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "bsr_dense"})
        for io in loop(nb):
            acc = T.alloc_buffer((rt, br), dtype, scope="global")
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
                        y[ro * rt + r, io * br + j] = T.max(acc[r, j] + bias[io * br + j], T.cast(lo, dtype))

    return bsr_dense


def _bsr_dense_inputs(m: int, k: int, n: int, bc: int, nnz: int, rt: int, dtype: str, lo: float, loop: Any) -> Any:
    """1 x ``bc`` blocks vectorized over a block's ``bc`` contiguous inputs (see
    :func:`bsr_dense_func`): ``rt`` rows of ``x`` per pass over a block row, each with ``bc``
    partial sums added up when the block row is done."""
    from tvm.script import tirx as T

    nb = n  # one output per block row

    @T.prim_func(private=True, s_tir=True)
    def bsr_dense_row(
        x: T.Buffer((m, k), dtype),
        data: T.Buffer((nnz, bc, 1), dtype),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), dtype),
        y: T.Buffer((m, n), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "bsr_dense"})
        for io in loop(nb):
            acc = T.alloc_buffer((rt, bc), dtype, scope="global")
            for ro in range(m // rt):
                for r in T.unroll(rt):
                    for c in T.vectorized(bc):
                        acc[r, c] = T.cast(0, dtype)
                for p in range(indptr[io], indptr[io + 1]):
                    for r in T.unroll(rt):
                        for c in T.vectorized(bc):
                            acc[r, c] = acc[r, c] + x[ro * rt + r, indices[p] * bc + c] * data[p, c, 0]
                for r in T.unroll(rt):
                    y[ro * rt + r, io] = bias[io]
                    for c in T.unroll(bc):
                        y[ro * rt + r, io] = y[ro * rt + r, io] + acc[r, c]
                    y[ro * rt + r, io] = T.max(y[ro * rt + r, io], T.cast(lo, dtype))

    return bsr_dense_row


def _bsr_dense_rows(m: int, k: int, n: int, bc: int, nnz: int, lanes: int, dtype: str, lo: float, loop: Any) -> Any:
    """1 x ``bc`` blocks, rows vectorized (see :func:`bsr_dense_func`): ``x`` is transposed once
    per call (in 8-column strips) so that a block's ``bc`` input columns are ``bc`` contiguous
    rows of ``x^T``; each block adds ``bc`` broadcast weights times a tile of ``rt`` rows into
    ``bc`` separate accumulators (independent FMA chains: one chain would wait on the FMA
    latency every block), which are summed when the block row is done and written to ``y^T``,
    transposed back at the end."""
    from tvm.script import tirx as T

    rt = next(v * lanes for v in (2, 1) if m % (v * lanes) == 0)  # rows per register tile
    strip = next(d for d in (8, 4, 2, 1) if k % d == 0 and n % d == 0)

    @T.prim_func(private=True, s_tir=True)
    def bsr_dense_rows(
        x: T.Buffer((m, k), dtype),
        data: T.Buffer((nnz, bc, 1), dtype),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((n + 1,), "int32"),
        bias: T.Buffer((n,), dtype),
        y: T.Buffer((m, n), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "bsr_dense"})
        xt = T.alloc_buffer((k, m), dtype)
        yt = T.alloc_buffer((n, m), dtype)
        for ko in loop(k // strip):
            for r in range(m):
                for ki in T.unroll(strip):
                    xt[ko * strip + ki, r] = x[r, ko * strip + ki]
        for io in loop(n):
            acc = T.alloc_buffer((bc, rt), dtype, scope="global")
            for ro in range(m // rt):
                for c in T.unroll(bc):
                    for j in T.vectorized(rt):
                        acc[c, j] = T.cast(0, dtype)
                for p in range(indptr[io], indptr[io + 1]):
                    for c in T.unroll(bc):
                        for j in T.vectorized(rt):
                            acc[c, j] = acc[c, j] + xt[indices[p] * bc + c, ro * rt + j] * data[p, c, 0]
                for j in T.vectorized(rt):
                    yt[io, ro * rt + j] = bias[io]
                for c in T.unroll(bc):
                    for j in T.vectorized(rt):
                        yt[io, ro * rt + j] = yt[io, ro * rt + j] + acc[c, j]
                for j in T.vectorized(rt):
                    yt[io, ro * rt + j] = T.max(yt[io, ro * rt + j], T.cast(lo, dtype))
        for no in loop(n // strip):
            for r in range(m):
                for ni in T.unroll(strip):
                    y[r, no * strip + ni] = yt[no * strip + ni, r]

    return bsr_dense_rows


def conv_offsets(
    indices: np.ndarray, block: tuple[int, int], shape: tuple[int, int, int, int], kernel: tuple[int, int]
) -> np.ndarray:
    """Per stored block and block column, the offset in padded NHWC input [N, Hp, Wp, C] of the
    input that column multiplies, relative to the output pixel's window corner: the column
    ``indices[p] * bc + cc`` of the ``[K, C*KH*KW]`` matrix decodes (ONNX order) to (c, kh, kw),
    at offset ``(kh * Wp + kw) * C + c``. Decoded at compile time, so the kernel does no
    division in its inner loop."""
    _, _, wp, c = shape
    kh, kw = kernel
    cols = indices.astype(np.int64)[:, None] * block[1] + np.arange(block[1])  # [nnz, bc]
    ch, tap = cols // (kh * kw), cols % (kh * kw)
    return (((tap // kw) * wp + tap % kw) * c + ch).astype(np.int32)


def bsr_conv2d_func(
    shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, int],
    k: int,
    block: tuple[int, int],
    nnzb: int,
    dtype: str = "float32",
    relu: bool = False,
) -> Any:
    """Block-sparse direct convolution on NHWC data that is already padded: ``x`` [N, Hp, Wp, C],
    weight as BSR of the ``[K, C*KH*KW]`` matrix (ONNX column order c, kh, kw) given by ``data``,
    ``offsets`` (:func:`conv_offsets`, in place of the block column indices) and ``indptr``;
    output [N, Ho, Wo, K]. Each stored block is visited once per tile of ``wt`` output pixels and
    reads its inputs at the precomputed offsets, so no im2col buffer is built. ``bias`` [K] and
    ``relu`` as in :func:`bsr_dense_func`."""
    from tvm.script import tirx as T

    lo = 0.0 if relu else -3.4e38

    n, hp, wp, c = shape
    sh, sw = stride
    ho, wo = out_hw
    br, bc = block
    nb = k // br
    nnz = max(nnzb, 1)
    wt = next(d for d in (6, 5, 4, 3, 2, 1) if wo % d == 0 and d * max(1, br // 8) <= 12)
    loop = T.parallel if n * ho * wo * nnz * br * bc >= PARALLEL_MIN_MACS else T.serial

    @T.prim_func(private=True, s_tir=True)
    def bsr_conv2d(
        x: T.Buffer((n, hp, wp, c), dtype),
        data: T.Buffer((nnz, bc, br), dtype),
        offsets: T.Buffer((nnz, bc), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((k,), dtype),
        y: T.Buffer((n, ho, wo, k), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "bsr_conv2d"})
        xf = T.decl_buffer((n * hp * wp * c,), dtype, data=x.data)
        for fused in loop(nb * n * ho):
            acc = T.alloc_buffer((wt, br), dtype, scope="global")
            for wo_o in range(wo // wt):
                for t in T.unroll(wt):
                    for j in T.vectorized(br):
                        acc[t, j] = T.cast(0, dtype)
                for p in range(indptr[fused // (n * ho)], indptr[fused // (n * ho) + 1]):
                    for cc in T.unroll(bc):
                        for t in T.unroll(wt):
                            for j in T.vectorized(br):
                                acc[t, j] = (
                                    acc[t, j]
                                    + xf[
                                        ((fused % (n * ho) // ho * hp + fused % ho * sh) * wp + (wo_o * wt + t) * sw)
                                        * c
                                        + offsets[p, cc]
                                    ]
                                    * data[p, cc, j]
                                )
                for t in T.unroll(wt):
                    for j in T.vectorized(br):
                        y[fused % (n * ho) // ho, fused % ho, wo_o * wt + t, fused // (n * ho) * br + j] = T.max(
                            acc[t, j] + bias[fused // (n * ho) * br + j], T.cast(lo, dtype)
                        )

    return bsr_conv2d


def _bsr_consts(matrix: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data, indices, indptr = to_bsr(matrix, block)
    if len(indices) == 0:  # an all-zero weight: one zero block keeps the buffers non-empty
        data, indices = np.zeros((1, block[1], block[0]), matrix.dtype), np.zeros(1, np.int32)
    return data, indices, indptr


def rewrite_bsr_dense(mod: Any, spec: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["bsr-dense"]``): block-sparse constant weights
    of ``relax.matmul`` to :func:`bsr_dense_func` calls and of NHWC ``relax.nn.conv2d`` (groups
    1, no dilation; the CPU pipeline converts layouts first) to :func:`bsr_conv2d_func` calls,
    through :func:`graphslim.kernels.rewrite.rewrite_contractions`. CPU targets only."""
    if spec.get("kind") != "llvm":
        return mod, False
    import tvm
    from graphslim.kernels.rewrite import ConvShape, KernelCall, rewrite_contractions
    from graphslim.kernels.schedules import vector_lanes

    lanes = vector_lanes(tvm.target.Target(spec))

    def dense(m: int, wt: np.ndarray) -> KernelCall | None:
        chosen = choose_block(wt, threshold, rows_vectorized=m >= lanes and m % lanes == 0)
        if chosen is None:
            return None
        block = chosen[0]
        data, indices, indptr = _bsr_consts(wt, block)
        make = functools.partial(bsr_dense_func, m, wt.shape[1], wt.shape[0], block, len(indices), lanes=lanes)
        return KernelCall(f"bsr_dense_{block[0]}x{block[1]}", make, [data, indices, indptr], f"{block[0]}x{block[1]}")

    def conv(s: ConvShape, w: np.ndarray) -> KernelCall | None:
        matrix = np.ascontiguousarray(w.transpose(3, 2, 0, 1)).reshape(s.k, -1)  # [K, C*KH*KW] as in ONNX
        chosen = choose_block(matrix, threshold, CONV_BLOCKS)
        if chosen is None:
            return None
        block = chosen[0]
        data, indices, indptr = _bsr_consts(matrix, block)
        shape = (s.n, s.hp, s.wp, s.c)
        make = functools.partial(
            bsr_conv2d_func, shape, (s.kh, s.kw), (s.sh, s.sw), (s.ho, s.wo), s.k, block, len(indices)
        )
        offsets = conv_offsets(indices, block, shape, (s.kh, s.kw))
        return KernelCall(f"bsr_conv2d_{block[0]}x{block[1]}", make, [data, offsets, indptr], f"{block[0]}x{block[1]}")

    mod, labels = rewrite_contractions(mod, dense, conv)
    return mod, bool(labels)
