"""graphslim's default CPU schedules for the dense hot ops, as dlight schedule rules.

TVM 0.27's Relax pipeline for CPU legalizes and fuses but does not schedule (dlight has only GEMV
and reduction rules for CPU), so a convolution runs as a naive seven-deep loop nest. The rules
here give every fused contraction (conv2d, depthwise conv, dense/matmul, pooling) and every
injective function a schedule without tuning. They assume the layout the backend gives them:
convolutions in NHWC with HWIO weights (``relax.transform.ConvertLayout``), so that the output
channel is the innermost, contiguous axis of the output, the weights and (for depthwise) the input.

The contraction rule is the classic CPU micro-kernel, written with ``tvm.s_tir.Schedule``
primitives (each checked by TVM, so a rule can make code slow but never wrong):

* the innermost output axis (channels, or N of a matmul) is the *vector axis*: split by a
  multiple of the SIMD width (8 fp32 lanes on AVX2, 16 on AVX-512, 4 on NEON) and vectorized;
* the next output axis (width, or M of a matmul) is the *register axis*: a small tile that is
  unrolled, so ``tile x vector`` accumulators stay in registers;
* the reduction loops (kh, kw, cin) run between the outer spatial loops and that register tile;
* the outer spatial loops are fused and parallelized; the accumulator is a per-tile cache whose
  fused epilogue (bias, BatchNorm leftovers, ReLU, residual add) runs right after the tile.

Functions a rule does not recognise are left to the next rule and, at the end, to TVM's
unscheduled default, which is always correct.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.target.codegen import target_has_features
from tvm_ffi import get_global_func

__all__ = [
    "PARALLEL_MIN_ELEMENTS",
    "PARALLEL_MIN_MACS",
    "ContractionCPU",
    "InjectiveCPU",
    "default_cpu_rules",
    "vector_bits",
    "vector_lanes",
]

log = logging.getLogger(__name__)

#: Work below which a kernel runs on one thread: waking TVM's thread pool costs a few
#: microseconds on the project's 2-CPU VMs, more than such kernels take (measured: a compressed
#: MNIST CNN ran 0.032-0.043 ms on one thread vs 0.037-0.059 ms on two). Multiply-adds for
#: contractions, elements for elementwise kernels. The elementwise threshold was lowered from 16k
#: to 4k on the Emerald Rapids VMs, where QDQ requantization (two float divisions per element)
#: dominates int8 models: the pruned + int8 ResNet-style net went from 0.15-0.16 to 0.12-0.14 ms,
#: the pruned fp32 one from 0.16 to 0.12 ms (MNIST CNN within noise).
PARALLEL_MIN_MACS = 200_000
PARALLEL_MIN_ELEMENTS = 4 * 1024


def vector_bits(target: Any) -> int:
    """SIMD register width of an LLVM target, from the features LLVM reports for its CPU.
    (``llvm_get_vector_width`` answers 512 for every x86 CPU in TVM 0.27, so it is not used.)"""

    def has(feature: str) -> bool:
        try:
            return bool(target_has_features(feature, target))
        except Exception:  # noqa: BLE001 - feature unknown to this target's LLVM backend
            return False

    if has("avx512f"):
        return 512
    if has("avx2") or has("avx"):
        return 256
    return 128  # SSE, NEON


def vector_lanes(target: Any, dtype_bits: int = 32) -> int:
    """SIMD lanes of ``dtype_bits`` elements on ``target`` (at least 4)."""
    return max(vector_bits(target) // dtype_bits, 4)


def _int(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest d <= limit with n % d == 0 and d % multiple_of == 0 (1 if none)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 1


class _Rule(ScheduleRule):
    """Base of graphslim's rules: CPU (LLVM) targets only."""

    def is_target_available(self, target: Any) -> bool:
        return target.kind.name == "llvm"


class ContractionCPU(_Rule):
    """Register-tiled, vectorized, parallel schedule for a function with one reduction block
    (conv2d / depthwise / matmul / pooling) plus injective producers (padding) and an
    elementwise epilogue."""

    def __init__(self, accumulators: int | None = None, l2_bytes: int = 256 * 1024) -> None:
        self.accumulators = accumulators  # SIMD registers given to the accumulator tile
        self.l2_bytes = l2_bytes

    def _tile(self, vec_ext: int, reg_ext: int, lanes: int, bits: int, panel: int | None = None) -> tuple[int, int]:
        """(vector tile, register tile): the pair with the most accumulator registers
        (at most ``accumulators``: 12 of the 16 AVX2 registers, 24 of 32 on AVX-512/NEON),
        preferring wider vectors on ties. Tiles divide their loops exactly; with ``panel`` (an
        operand packed in panels of that many outputs, :mod:`graphslim.kernels.dense`) the vector
        tile divides the panel, so that its loads stay contiguous."""
        budget = self.accumulators or (12 if bits == 256 else 24)
        best = (0, 0, 1, 1)
        for groups in (1, 2, 4):
            if vec_ext % lanes == 0:
                if vec_ext % (lanes * groups) or (panel is not None and panel % (lanes * groups)):
                    continue
                v = lanes * groups
            elif groups == 1:
                v = vec_ext if vec_ext <= 2 * lanes else _largest_divisor(vec_ext, 2 * lanes)
            else:
                continue
            g = -(-v // lanes)
            if g > budget:
                continue
            r = _largest_divisor(reg_ext, max(1, min(budget // g, 8)))
            if groups == 4 and r > 1:
                continue  # four vector groups only for single-row (GEMV-like) tiles
            score = (r * g, g, v, r)
            if score > best:
                best = score
        return best[2], best[3]

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return _guarded(self._apply, func, target)

    def _block_rows(
        self,
        sch: Any,
        outer: list[Any],
        v_out: Any,
        spatial: list[int],
        extents: list[int],
        vec_i: int,
        reg_i: int | None,
        r_in: int,
        row_bytes: int,
    ) -> list[Any]:
        """Outer tile loops for a weight larger than L2 (see the caller): ``outer`` holds the
        other spatial loops then the row-tile loop (when there is one)."""
        budget = self.l2_bytes // 2
        others = [extents[i] for i in spatial if i not in (vec_i, reg_i)]
        tiles = extents[reg_i] // r_in if reg_i is not None else 1
        rows = r_in * tiles
        for e in others:
            rows *= e
        if rows * row_bytes <= budget or reg_i is None:
            return [v_out, *outer]
        # innermost loops whose rows fit the budget stay inside the column loop
        fit_tiles = max(1, budget // (row_bytes * r_in))
        if tiles > fit_tiles:
            block = _largest_divisor(tiles, fit_tiles)
            blk, mid = sch.split(outer[-1], factors=[None, block])
            return [*outer[:-1], blk, v_out, mid]
        inner_rows, cut = r_in * tiles, len(outer) - 1
        while cut > 0 and inner_rows * others[cut - 1] * row_bytes <= budget:
            cut -= 1
            inner_rows *= others[cut]
        return [*outer[:cut], v_out, *outer[cut:]]

    def _apply(self, func: Any, target: Any) -> Any:
        sch = s_tir.Schedule(func)
        c = _contraction(sch)
        if c is None:
            return None
        lanes = vector_lanes(target, c.dtype_bits)
        tiles = self._tile_loops(sch, c, lanes, vector_bits(target))
        _schedule_tiles(sch, c, tiles, lanes)
        return sch

    def _tile_loops(self, sch: Any, c: _Contraction, lanes: int, bits: int) -> _Tiles:
        """Split the vector and register axes into tiles, order the loops (tile loops outermost,
        then the reduction, then the register tile and the vector) and fuse the tile loops."""
        extents, spatial, vec_i, reg_i = c.extents, c.spatial, c.vec_i, c.reg_i
        loops = c.main.get_loops()
        v_in, r_in = self._tile(
            extents[vec_i],
            extents[reg_i] if reg_i is not None else 1,
            lanes,
            bits,
            _panel_width(c.stmt, c.vars[vec_i]),
        )
        v_out, v_inner = sch.split(loops[vec_i], factors=[None, v_in])
        reg_tile = r_out = None
        if r_in > 1:
            r_out, reg_tile = sch.split(loops[reg_i], factors=[None, r_in])
        elif reg_i is not None:
            r_out = loops[reg_i]
        outer = [loops[i] for i in spatial if i not in (vec_i, reg_i)]
        if r_out is not None:
            outer.append(r_out)
        # Loop order of the tiles. A weight that fits L2: rows outer, columns inner (each row
        # tile's inputs stay in L1 while the weight streams from L2). A larger weight: columns
        # outermost, so each weight panel is read once for all rows, as long as the rows' inputs
        # fit half of L2; where they do not either (a transformer's FFN at batch 16: 2048 rows
        # of 1 KiB), the rows are cut into blocks that fit, with the columns walked per block
        # (the weight is then read once per block instead of the inputs once per column panel).
        row_bytes = c.dtype_bits // 8
        for i in c.reduce:
            row_bytes *= extents[i]
        weight_bytes = extents[vec_i] * row_bytes
        if weight_bytes <= self.l2_bytes:
            outer.append(v_out)
        else:
            outer = self._block_rows(sch, outer, v_out, spatial, extents, vec_i, reg_i, r_in, row_bytes)
        red = [loops[i] for i in c.reduce]
        inner = ([reg_tile] if reg_tile is not None else []) + [v_inner]
        sch.reorder(*outer, *red, *inner)
        # Parallelize the outer spatial loops (all of them fused: enough work for the cores).
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        return _Tiles(fused, red, reg_tile, v_inner, v_in)


@dataclass(frozen=True, eq=False)
class _Contraction:
    """What :class:`ContractionCPU` schedules: the one reduction block (``main``, its statement,
    at ``index`` among all ``blocks``), its loop extents and variables, the spatial and reduction
    loops, the loops over the innermost (vector) and second-innermost (register) output axes,
    and the output's element width."""

    blocks: list[Any]
    index: int
    main: Any
    stmt: Any
    extents: list[int]
    vars: list[Any]
    spatial: list[int]
    reduce: list[int]
    vec_i: int
    reg_i: int | None
    dtype_bits: int


@dataclass(frozen=True, eq=False)
class _Tiles:
    """The loops :meth:`ContractionCPU._tile_loops` made: the fused (parallel) tile loop, the
    reduction loops, the register tile (None: one row) and the vector loop of ``v_in``."""

    fused: Any
    red: list[Any]
    reg_tile: Any
    v_inner: Any
    v_in: int


def _contraction(sch: Any) -> _Contraction | None:
    """Check: the function has exactly one reduction block, after which everything is injective
    (the epilogue; before it only injective producers: padding, layout copies), with static
    extents, one output, and its innermost output axis indexed by a spatial loop; else None."""
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1:
        return None
    main = reductions[0]
    kinds = main.dom_kind()
    if any(k not in "SR" for k in kinds):
        return None
    extents = [_int(d) for d in main.dom()]
    if any(e is None for e in extents):
        return None
    stmt = sch.get(main.block_rv)
    if len(stmt.writes) != 1:
        return None
    out_region = stmt.writes[0].region
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    reduce_ = [i for i, k in enumerate(kinds) if k == "R"]
    if not spatial or not reduce_:
        return None
    # Which spatial iter indexes the innermost / second-innermost output dimension.
    vars_ = [it.var for it in main.iters]

    def iter_of_dim(d: int) -> int | None:
        if d < 0 or d >= len(out_region):
            return None
        m = out_region[d].min
        for i in spatial:
            if m.same_as(vars_[i]):
                return i
        return None

    vec_i = iter_of_dim(len(out_region) - 1)
    if vec_i is None:
        return None
    reg_i = iter_of_dim(len(out_region) - 2)
    dtype_bits = stmt.writes[0].source.dtype.bits
    return _Contraction(
        infos, infos.index(main), main, stmt, extents, vars_, spatial, reduce_, vec_i, reg_i, dtype_bits
    )


def _schedule_tiles(sch: Any, c: _Contraction, t: _Tiles, lanes: int) -> None:
    """The rest of the contraction schedule on the tiled loops: the epilogue per finished tile,
    parallel / unrolled / vectorized loops, the reduction's init, the producers."""
    block = c.main.block_rv
    # The epilogue (bias, ReLU, residual add...) runs on each finished tile: its chain is
    # inlined into the last block, which is computed at the tile loop, and the
    # accumulator buffer shrinks to the tile. Without an epilogue the output is written
    # through a tile-sized cache.
    remaining = [b.block_rv for b in c.blocks[c.index + 1 :]]
    for b in remaining[:-1]:
        sch.compute_inline(b)
    if remaining:
        tail = remaining[-1]
    else:
        tail = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(tail, t.fused, preserve_unit_loops=True)
    macs = 1
    for e in c.extents:
        macs *= e
    if macs >= PARALLEL_MIN_MACS:
        sch.parallel(t.fused)
    if t.reg_tile is not None:
        sch.unroll(t.reg_tile)
    if t.v_in > 1:
        sch.vectorize(t.v_inner)
    sch.decompose_reduction(block, t.red[0])
    # Vectorize the epilogue's innermost loop over the same width.
    tail_loops = sch.get_loops(tail)
    if len(tail_loops) > 1:
        ext = _int(sch.get(tail_loops[-1]).extent)
        if ext and ext > 1 and ext == t.v_in:
            sch.vectorize(tail_loops[-1])
    # Producers: plain copies are inlined; padding gets its own parallel, vectorized
    # loop nest (inlined, its bounds check would sit in the inner loop).
    for b in reversed(c.blocks[: c.index]):
        if not _has_if_then_else(sch, b.block_rv):
            try:
                sch.compute_inline(b.block_rv)
                continue
            except Exception:  # noqa: BLE001 - not inlinable: scheduled on its own
                pass
        _parallel_vectorize(sch, b.block_rv, lanes)


class InjectiveCPU(_Rule):
    """Elementwise / broadcast / layout functions: inline into the last block, then a
    parallel outer loop and a vectorized inner loop."""

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return _guarded(self._apply, func, target)

    def _apply(self, func: Any, target: Any) -> Any:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        left = try_inline(sch, list(infos))
        for b in left:
            _parallel_vectorize(sch, b.block_rv, vector_lanes(target))
        return sch


def _panel_width(stmt: Any, var: Any) -> int | None:
    """``P`` where the block reads an operand's last axis at ``var % P`` (a weight packed in panels
    of ``P`` outputs, read as ``wp[j // P, k, j % P]``), else None."""
    for read in stmt.reads:
        m = read.region[-1].min if read.region else None
        if isinstance(m, tirx.FloorMod) and m.a.same_as(var) and isinstance(m.b, tirx.IntImm):
            return int(m.b.value)
    return None


def _has_if_then_else(sch: Any, block: Any) -> bool:
    return bool(get_global_func("s_tir.schedule.HasIfThenElse")(sch.get(block)))


def _guarded(apply: Any, func: Any, target: Any) -> Any:
    """Run a rule; a schedule primitive that refuses (TVM checks each one) means "not this rule",
    so the function falls through to the next rule. GRAPHSLIM_SCHEDULE_DEBUG=1 re-raises."""
    try:
        return apply(func, target)
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types from C++
        if os.environ.get("GRAPHSLIM_SCHEDULE_DEBUG"):
            raise
        log.debug("schedule rule %s skipped a function: %s", type(apply.__self__).__name__, e)
        return None


def _parallel_vectorize(sch: Any, block: Any, lanes: int) -> None:
    """Fuse a block's loops, then split them into a parallel outer and a vectorized inner loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner_ext = _int(sch.get(loops[-1]).extent)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _int(sch.get(fused).extent)
    if total is None or total < 2:
        return
    vec = lanes if inner_ext and inner_ext % lanes == 0 else (inner_ext if inner_ext and inner_ext <= lanes else 1)
    parallel = total >= PARALLEL_MIN_ELEMENTS
    if vec > 1 and total % vec == 0 and total > vec:
        outer, inner = sch.split(fused, factors=[None, vec])
        if parallel:
            sch.parallel(outer)
        sch.vectorize(inner)
    elif parallel:
        sch.parallel(fused)


def default_cpu_rules() -> list[Any]:
    """The rules the backend applies, in order (first match wins)."""
    return [ContractionCPU(), InjectiveCPU(), dlight.cpu.Reduction(), dlight.cpu.GEMV()]
