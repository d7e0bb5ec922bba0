"""Fused attention: ``softmax(Q K^T * scale + mask) V`` as one CPU kernel, and the Relax rewrite.

A transformer's attention, as exported to ONNX and imported by TVM, is two batched matmuls around
a softmax: ``matmul(Q, K^T)``, a scale, an additive mask, ``softmax(axis=-1)``, ``matmul(P, V)``.
Run as three kernels, the scores ``[B, H, S, T]`` go through memory three times (written by the
first matmul, read and written by the softmax, read by the second matmul): 4 MB at batch 16 and
sequence 128 with 4 heads, well past L2. In the pruned int8 BERT-style encoder of
``benchmarks/transformer_speed.py`` those three kernels were 15-20% of the run (batch 16: 7.4 +
7.8 + 4.5 of 91 ms; the two matmuls at 18 GMAC/s against the int8 kernels' 63).

Here, per (batch, head) and block of ``rows`` query rows, the scores of the block are computed
into a buffer that stays in L1 (register tiles of ``rows`` x ``2 * lanes``, one broadcast of
``Q`` and one vector load of ``K^T`` per step), scaled and masked on the way out of the
registers; each row's softmax runs on it in place (vector max, TVM's ``fast_exp`` inline as in
:mod:`graphslim.kernels.rows`, vector sum), and ``P V`` accumulates in ``rows`` x ``Dv``
registers, normalized by ``1 / sum`` as it is stored. Nothing of size ``S x T`` leaves the cache.

Matched (CPU targets, float32, static shapes, rank-4 ``[B, H, S, D]`` operands with the same
``B, H``): ``matmul(P, V)`` where ``P = softmax(X, axis=-1)`` and ``X`` is ``matmul(Q, KT)``
followed by any of ``multiply`` / ``divide`` by a scalar constant and ``add`` of a mask that
broadcasts to ``[B, H, S, T]`` with ``T`` whole; ``Dv`` a multiple of the vector width.
Anything else (a causal mask by ``where``, an attention-probabilities output...) keeps the
three kernels; a matched softmax that something else also reads is computed twice, never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from graphslim.kernels.pipeline import static_shape

__all__ = ["attention_func", "rewrite_attention"]

#: Registers the output tile may take (16 ymm on AVX2, less the operands).
_OUT_REGISTERS = 12


def _rows(s: int, dv_vectors: int) -> int:
    """Query rows per block: as many as the output tile's registers allow (and divide ``s``)."""
    return next(r for r in (4, 2, 1) if s % r == 0 and r * max(dv_vectors, 2) <= _OUT_REGISTERS or r == 1)


def attention_func(
    shape: tuple[int, int, int, int, int, int],
    mask_shape: tuple[int, int, int, int],
    scale: float,
    lanes: int,
) -> Any:
    """PrimFunc ``(q[B,H,S,D], kt[B,H,D,T], v[B,H,T,Dv], mask[mb,mh,ms,T], y[B,H,S,Dv])`` with
    ``shape = (B, H, S, T, D, Dv)``: ``y = softmax(q @ kt * scale + mask) @ v`` over the last axis,
    the mask broadcast over any of its first three axes of size 1. ``Dv`` a multiple of ``lanes``;
    any ``T`` (whole vectors of keys, then the rest one at a time).

    Long: one TVMScript kernel definition, three macros per block of query rows (``scores``,
    ``softmax_rows``, ``weighted_values``) and the loop that calls them, sharing the tile geometry
    they close over, so it reads as one piece."""
    from graphslim.kernels.rows import fast_exp, fold_partials
    from graphslim.kernels.schedules import PARALLEL_MIN_MACS
    from tvm.script import tirx as T

    b, h, s, t, d, dv = shape
    mb, mh, ms, _ = mask_shape
    rows = _rows(s, dv // lanes)
    chunks = t // lanes  # whole vectors of keys; the rest (``tail``) one at a time
    tail = t - chunks * lanes
    # the scores tile: rows x g vectors, up to 12 accumulators (independent FMA chains)
    tv = lanes * max(g for g in (8, 4, 3, 2, 1) if chunks % g == 0 and rows * g <= _OUT_REGISTERS)
    loop = T.parallel if b * h * s * t * (d + dv) >= PARALLEL_MIN_MACS else T.serial
    fold_max, fold_sum = fold_partials(1, lanes, T.max), fold_partials(1, lanes, lambda x, y: x + y)
    # the mask's index on an axis it broadcasts over is 0
    pick_b = (lambda i: i) if mb > 1 else (lambda i: 0)
    pick_h = (lambda i: i) if mh > 1 else (lambda i: 0)
    pick_s = (lambda i: i) if ms > 1 else (lambda i: 0)

    @T.macro
    def scores(q, kt, mask, sc, acc, bh, sb):  # sc = q kt * scale + mask for the block's rows
        for to in range(chunks * lanes // tv):  # rows x tv register tiles
            for r in T.unroll(rows):
                for j in T.vectorized(tv):
                    acc[r, j] = T.float32(0)
            for k in range(d):
                for r in T.unroll(rows):
                    for j in T.vectorized(tv):
                        acc[r, j] = (
                            acc[r, j] + q[bh // h, bh % h, sb * rows + r, k] * kt[bh // h, bh % h, k, to * tv + j]
                        )
            for r in T.unroll(rows):
                for j in T.vectorized(tv):
                    sc[r, to * tv + j] = (
                        acc[r, j] * T.float32(scale)
                        + mask[pick_b(bh // h), pick_h(bh % h), pick_s(sb * rows + r), to * tv + j]
                    )
        for r, j in T.grid(rows, tail):  # keys past the last whole vector (ViT: 197)
            sc[r, chunks * lanes + j] = T.float32(0)
            for k in range(d):
                sc[r, chunks * lanes + j] = (
                    sc[r, chunks * lanes + j]
                    + q[bh // h, bh % h, sb * rows + r, k] * kt[bh // h, bh % h, k, chunks * lanes + j]
                )
            sc[r, chunks * lanes + j] = (
                sc[r, chunks * lanes + j] * T.float32(scale)
                + mask[pick_b(bh // h), pick_h(bh % h), pick_s(sb * rows + r), chunks * lanes + j]
            )

    @T.macro
    def softmax_rows(sc, part, red):  # exp(sc - max) in place; red = (max, sum) per row
        for r in range(rows):
            for j in T.vectorized(lanes):
                part[0, j] = T.float32(-3.4028234663852886e38)
            for c in range(chunks):
                for j in T.vectorized(lanes):
                    part[0, j] = T.max(part[0, j], sc[r, c * lanes + j])
            fold_max(part, red, r * 2)
            for j in range(tail):
                red[r * 2] = T.max(red[r * 2], sc[r, chunks * lanes + j])
            for j in T.vectorized(lanes):
                part[0, j] = T.float32(0)
            for c in range(chunks):
                for j in T.vectorized(lanes):
                    sc[r, c * lanes + j] = fast_exp(sc[r, c * lanes + j] - red[r * 2])
                    part[0, j] = part[0, j] + sc[r, c * lanes + j]
            fold_sum(part, red, r * 2 + 1)
            for j in range(tail):
                sc[r, chunks * lanes + j] = fast_exp(sc[r, chunks * lanes + j] - red[r * 2])
                red[r * 2 + 1] = red[r * 2 + 1] + sc[r, chunks * lanes + j]

    @T.macro
    def weighted_values(v, y, sc, out, red, bh, sb):  # y = (sc v) / sum: rows x dv accumulators
        for r in T.unroll(rows):
            for j in T.vectorized(dv):
                out[r, j] = T.float32(0)
        for k in range(t):
            for r in T.unroll(rows):
                for j in T.vectorized(dv):
                    out[r, j] = out[r, j] + sc[r, k] * v[bh // h, bh % h, k, j]
        for r in T.unroll(rows):
            for j in T.vectorized(dv):
                y[bh // h, bh % h, sb * rows + r, j] = out[r, j] * (T.float32(1) / red[r * 2 + 1])

    @T.prim_func(private=True, s_tir=True)
    def attention(
        q: T.Buffer((b, h, s, d), "float32"),
        kt: T.Buffer((b, h, d, t), "float32"),
        v: T.Buffer((b, h, t, dv), "float32"),
        mask: T.Buffer((mb, mh, ms, t), "float32"),
        y: T.Buffer((b, h, s, dv), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphslim.kernel": "attention"})
        with T.sblock("root"):
            for bh in loop(b * h):
                # global scope: small constant-size buffers are stack slots (kernels/__init__.py)
                sc = T.alloc_buffer((rows, t), "float32", scope="global")
                acc = T.alloc_buffer((rows, tv), "float32", scope="global")
                out = T.alloc_buffer((rows, dv), "float32", scope="global")
                part = T.alloc_buffer((1, lanes), "float32", scope="global")
                red = T.alloc_buffer((rows * 2,), "float32", scope="global")  # max, sum
                for sb in range(s // rows):
                    scores(q, kt, mask, sc, acc, bh, sb)
                    softmax_rows(sc, part, red)
                    weighted_values(v, y, sc, out, red, bh, sb)

    return attention


@dataclass(frozen=True, eq=False)
class _Attention:
    """What :func:`rewrite_attention` replaces: the operands (``mask`` None: no mask), the scale,
    and the static sizes ``(B, H, S, T, D, Dv)``."""

    q: Any
    kt: Any
    v: Any
    mask: Any | None
    scale: float
    shape: tuple[int, int, int, int, int, int]


def _scalar(expr: Any) -> float | None:
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        return None
    value = expr.value.numpy()
    return float(value.reshape(())) if value.size == 1 and value.dtype == np.float32 else None


def _attention_operands(call: Any, bound: Any, ops: dict[str, Any]) -> tuple[Any, Any, Any, Any, float] | None:
    """Pattern: (q, kt, v, mask or None, scale) of ``matmul(softmax(X, -1), v)`` with ``X`` =
    ``matmul(q, kt)``, an optional ``multiply`` / ``divide`` by a scalar constant, then an optional
    ``add`` of a mask in either operand order (the sum is the same whichever side is taken for
    the scores)."""

    def is_call(e: Any, name: str) -> bool:
        return hasattr(e, "op") and e.op == ops[name]

    def scores(x: Any) -> tuple[Any, float] | None:  # matmul(q, kt) [* or / scalar]
        scale = 1.0
        if is_call(x, "multiply") or is_call(x, "divide"):
            c0, c1 = _scalar(x.args[0]), _scalar(x.args[1])
            if is_call(x, "divide"):
                if not c1:
                    return None
                scale, x = 1.0 / c1, bound(x.args[0])
            elif c1 is not None:
                scale, x = c1, bound(x.args[0])
            elif c0 is not None:
                scale, x = c0, bound(x.args[1])
            else:
                return None
        return (x, scale) if is_call(x, "matmul") else None

    p, v = bound(call.args[0]), call.args[1]
    if not is_call(p, "nn.softmax") or int(p.attrs.axis) not in (-1, len(static_shape(p, "float32") or []) - 1):
        return None
    x = bound(p.args[0])
    mask, found = None, scores(x)
    if found is None and is_call(x, "add"):
        for chain, other in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            found = scores(bound(chain))
            if found is not None:
                mask = other
                break
    if found is None:
        return None
    (mm, scale) = found
    return mm.args[0], mm.args[1], v, mask, scale


def _check_attention(q: Any, kt: Any, v: Any, mask: Any, scale: float, lanes: int) -> _Attention | None:
    """Check: float32 rank-4 operands with equal ``[B, H]``, ``Dv`` whole vectors, a mask
    that broadcasts to ``[B, H, S, T]`` with its last axis ``T``."""
    qs, ks, vs = static_shape(q, "float32"), static_shape(kt, "float32"), static_shape(v, "float32")
    if qs is None or ks is None or vs is None or not len(qs) == len(ks) == len(vs) == 4:
        return None
    (b, h, s, d), (_, _, d2, t), (_, _, t2, dv) = qs, ks, vs
    if qs[:2] != ks[:2] or qs[:2] != vs[:2] or d != d2 or t != t2 or dv % lanes:
        return None
    if mask is not None:
        ms = static_shape(mask, "float32")
        if ms is None or len(ms) > 4 or not ms or ms[-1] != t:
            return None
        ms = [1] * (4 - len(ms)) + ms
        if any(m not in (1, full) for m, full in zip(ms[:3], (b, h, s), strict=True)):
            return None
    return _Attention(q, kt, v, mask, scale, (b, h, s, t, d, dv))


def _attention_call(builder: Any, match: _Attention, lanes: int) -> Any:
    """Rewrite: :func:`attention_func` on ``match`` (the mask reshaped to rank 4; none: zeros)."""
    from tvm import relax

    b, h, s, t, d, dv = match.shape
    if match.mask is None:
        mask, mask_shape = relax.const(np.zeros((1, 1, 1, t), np.float32)), (1, 1, 1, t)
    else:
        ms = static_shape(match.mask, "float32")
        mask_shape = tuple([1] * (4 - len(ms)) + ms)
        mask = match.mask if len(ms) == 4 else builder.emit(relax.op.reshape(match.mask, mask_shape))
    gv = builder.add_func(attention_func(match.shape, mask_shape, match.scale, lanes), "attention")
    return relax.call_tir(gv, [match.q, match.kt, match.v, mask], relax.TensorType((b, h, s, dv), "float32"))


def rewrite_attention(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """Relax rewrite (``graphslim.kernels.REWRITES["attention"]``, CPU targets): the
    ``matmul -> scale -> mask -> softmax -> matmul`` chain of attention -> :func:`attention_func`
    (see the module docstring). Pattern :func:`_attention_operands`, check
    :func:`_check_attention`, rewrite :func:`_attention_call`."""
    if spec.get("kind") != "llvm":
        return mod, False
    import tvm
    from graphslim.kernels.pipeline import rewrite_calls
    from graphslim.kernels.schedules import vector_lanes

    lanes = vector_lanes(tvm.target.Target(spec))
    ops = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("matmul", "nn.softmax", "add", "multiply", "divide")}

    def rewrite(builder: Any, call: Any, bound: Any) -> Any:
        if static_shape(call, "float32") is None:
            return None
        found = _attention_operands(call, bound, ops)
        match = None if found is None else _check_attention(*found, lanes)
        return None if match is None else _attention_call(builder, match, lanes)

    return rewrite_calls(mod, [ops["matmul"]], rewrite)
