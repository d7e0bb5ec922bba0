"""Structured pruning on top of the channel analysis: importance, selection, physical removal.

Three separate ideas, as in Torch-Pruning: the dependency groups come from
:mod:`graphslim.analysis.channels`; an *importance criterion* (``CRITERIA``) gives one score per
channel of a group; :func:`apply_pruning` removes the chosen channels from every use (weights,
biases, per-channel constants, depthwise groups, Split sizes, Reshape shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphslim.analysis.channels import ChannelAnalysis, Group, Use
from graphslim.analysis.cost import layer_macs
from graphslim.core.ir import Graph

__all__ = ["CRITERIA", "apply_pruning", "estimate_cost", "group_scores", "keep_counts", "select_channels"]


# --------------------------------------------------------------------------- importance


def _use_norm(graph: Graph, use: Use, size: int, power: int) -> np.ndarray | None:
    """Per-channel L1 (power=1) or L2 (power=2) norm of the weights a use touches."""
    w = graph.constant(use.node.inputs[use.index])
    if w is None:
        return None
    # One temporary of the weight's own dtype (not float64 copies: big weights matter here),
    # accumulated in float64.
    mag = np.square(w) if power == 2 else np.abs(w)
    if use.kind == "group_in":
        groups = int(use.node.attrs.get("group", 1))
        cout, cpg = mag.shape[0], mag.shape[1]
        per = mag.reshape(groups, cout // groups, cpg, -1).sum(axis=(1, 3), dtype=np.float64).reshape(groups * cpg)
    else:
        part = np.moveaxis(mag, use.axis, 0)[use.offset : use.offset + size * use.rep]
        per = part.reshape(size, -1).sum(axis=1, dtype=np.float64)
    return np.sqrt(per) if power == 2 else per


def _mean_normalized(vectors: list[np.ndarray], size: int) -> np.ndarray:
    total = np.zeros(size)
    for v in vectors:
        m = v.mean()
        total += v / m if m > 0 else v
    return total / max(len(vectors), 1)


def _norm_criterion(power: int) -> Callable[..., np.ndarray]:
    def score(graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator) -> np.ndarray:
        # Weights only (input 1), as Torch-Pruning's magnitude importance: a bias vector would
        # otherwise weigh as much as a whole filter after normalization.
        vecs = [
            v
            for _, u in an.group_uses(group)
            if u.kind in ("out", "in", "group_in") and u.index == 1
            for v in [_use_norm(graph, u, group.size, power)]
            if v is not None
        ]
        return _mean_normalized(vecs, group.size)

    return score


def _bn_gamma(graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator) -> np.ndarray | None:
    """Network Slimming (Liu et al., ICCV 2017): |gamma| of the BatchNormalizations on the group."""
    vecs = []
    for _, u in an.group_uses(group):
        if u.kind == "param" and u.node.op == "BatchNormalization" and u.index == 1:
            gamma = graph.constant(u.node.inputs[1])
            vecs.append(np.abs(gamma.astype(np.float64).reshape(-1)[u.offset : u.offset + group.size]))
    return _mean_normalized(vecs, group.size) if vecs else None


def _random(graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator) -> np.ndarray:
    return rng.random(group.size)


#: criterion name -> f(graph, analysis, group, rng) -> one score per channel (None: not applicable)
CRITERIA: dict[str, Callable[..., np.ndarray | None]] = {
    "l1": _norm_criterion(1),
    "l2": _norm_criterion(2),
    "bn-gamma": _bn_gamma,
    "random": _random,
}


def group_scores(
    graph: Graph, an: ChannelAnalysis, groups: list[Group], criterion: str, rng: np.random.Generator
) -> tuple[dict[int, np.ndarray], int]:
    """Scores per prunable group; groups where the criterion does not apply fall back to l1.
    Returns the scores and how many groups fell back."""
    scores, fallbacks = {}, 0
    for g in groups:
        s = CRITERIA[criterion](graph, an, g, rng)
        if s is None:
            fallbacks += 1
            s = CRITERIA["l1"](graph, an, g, rng)
        scores[g.id] = s
    return scores, fallbacks


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Rounding:
    round_to: int = 1
    min_channels: int = 1

    def keep(self, group: Group, raw: int) -> int:
        """Channels to keep: at least min_channels, a multiple of round_to and of the group's
        slices, at most all of them."""
        m = self.round_to * group.slices // math.gcd(self.round_to, group.slices)
        n = max(raw, self.min_channels, 1)
        n = math.ceil(n / m) * m
        return min(n, group.size)


def keep_counts(
    groups: list[Group], scores: dict[int, np.ndarray], ratio: float, scope: str, rounding: Rounding
) -> dict[int, int]:
    """How many channels each group keeps at pruning ``ratio``."""
    if scope == "local":
        return {g.id: rounding.keep(g, g.size - int(math.floor(ratio * g.size + 1e-9))) for g in groups}
    # Global: one ranking of all channels by normalized score; ties broken by group, then index.
    entries = [(float(s), g.id, i) for g in groups for i, s in enumerate(scores[g.id])]
    entries.sort()
    n_prune = int(math.floor(ratio * len(entries) + 1e-9))
    pruned: dict[int, int] = {}
    for _, gid, _ in entries[:n_prune]:
        pruned[gid] = pruned.get(gid, 0) + 1
    return {g.id: rounding.keep(g, g.size - pruned.get(g.id, 0)) for g in groups}


def select_channels(group: Group, score: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted) of the ``keep`` best channels; equal counts per slice for grouped convs."""
    if keep >= group.size:
        return np.arange(group.size)
    per = group.size // group.slices
    k = keep // group.slices
    kept = []
    for s in range(group.slices):
        part = score[s * per : (s + 1) * per]
        order = np.lexsort((np.arange(per), -part))  # highest score first, lower index on ties
        kept.append(np.sort(order[:k]) + s * per)
    return np.concatenate(kept)


# --------------------------------------------------------------------------- cost estimate


def estimate_cost(graph: Graph, an: ChannelAnalysis, keep: dict[int, int], base: tuple[int, int]) -> tuple[int, int]:
    """Exact (params, MACs) after pruning to ``keep`` counts, without touching the graph.

    ``base`` is the (params, MACs) of the graph as it is (from the cost model).

    Channel pruning shrinks constants along the pruned axes and leaves spatial sizes alone, so a
    weight's MACs scale with its size.
    """
    removed: dict[tuple[int, int], dict[int, int]] = {}
    nodes = {}
    for g in an.groups:
        cut = g.size - keep.get(g.id, g.size)
        if cut <= 0:
            continue
        for _, u in an.group_uses(g):
            key = (id(u.node), u.index)
            nodes[key] = u.node
            per_axis = removed.setdefault(key, {})
            if u.kind == "group_in":
                groups = int(u.node.attrs.get("group", 1))
                per_axis[1] = per_axis.get(1, 0) + cut // groups
            else:
                per_axis[u.axis] = per_axis.get(u.axis, 0) + cut * u.rep
    params, macs = base
    for key, per_axis in removed.items():
        node = nodes[key]
        val = graph.constant(node.inputs[key[1]])
        frac = 1.0
        for axis, n in per_axis.items():
            frac *= max(val.shape[axis] - n, 0) / val.shape[axis]
        params -= int(round(val.size * (1 - frac)))
        if key[1] == 1 and node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            m, _ = layer_macs(graph, node)
            macs -= int(round(m * (1 - frac)))
    return params, macs


# --------------------------------------------------------------------------- removal


def apply_pruning(graph: Graph, an: ChannelAnalysis, kept: dict[int, np.ndarray]) -> int:
    """Remove every channel not in ``kept[group]`` from the graph. Returns channels removed."""
    removed_total = 0
    deletions: dict[tuple[int, int], tuple[object, dict[int, set[int]]]] = {}
    group_in: list[tuple[Use, np.ndarray]] = []
    kept_count: dict[int, int] = {}
    for g in an.groups:
        keep = kept.get(g.id)
        if keep is None or len(keep) >= g.size:
            continue
        drop = np.setdiff1d(np.arange(g.size), keep)
        removed_total += len(drop) * len(g.roots)
        for r in g.roots:
            kept_count[r] = len(keep)
        for _, u in an.group_uses(g):
            if u.kind == "group_in":
                group_in.append((u, drop))
                continue
            idx = (u.offset + drop[:, None] * u.rep + np.arange(u.rep)[None, :]).reshape(-1)
            entry = deletions.setdefault((id(u.node), u.index), (u.node, {}))
            entry[1].setdefault(u.axis, set()).update(idx.tolist())
    # Grouped-conv columns first: they index the original per-group layout.
    for u, drop in group_in:
        w = graph.constant(u.node.inputs[u.index])
        groups = int(u.node.attrs.get("group", 1))
        cout, cpg = w.shape[0], w.shape[1]
        opg = cout // groups
        parts = []
        for gi in range(groups):
            local = [d - gi * cpg for d in drop if gi * cpg <= d < (gi + 1) * cpg]
            parts.append(np.delete(w[gi * opg : (gi + 1) * opg], local, axis=1))
        graph.set_constant(u.node, u.index, np.concatenate(parts, axis=0))
    for (_, index), (node, per_axis) in deletions.items():
        val = graph.constant(node.inputs[index])
        for axis, idx in per_axis.items():
            val = np.delete(val, sorted(idx), axis=axis)
        graph.set_constant(node, index, val)
    _fixups(graph, an, kept_count)
    return removed_total


def _features_after(an: ChannelAnalysis, tensor_id: int, kept_count: dict[int, int]) -> int:
    tc = an.tensors[tensor_id]
    return sum(kept_count.get(s.root, s.length) * s.rep for s in tc.segs)


def _fixups(graph: Graph, an: ChannelAnalysis, kept_count: dict[int, int]) -> None:
    for kind, node in an.fixups:
        if kind == "depthwise":
            w = graph.constant(node.inputs[1])
            if int(node.attrs.get("group", 1)) != w.shape[0]:
                graph.set_attr(node, "group", int(w.shape[0]))
        elif kind == "split":
            sizes = np.array([_features_after(an, id(o), kept_count) for o in node.outputs], dtype=np.int64)
            old = graph.constant(node.inputs[1])
            if not np.array_equal(old, sizes):
                graph.set_constant(node, 1, sizes)
        elif kind == "reshape":
            out = node.outputs[0]
            axis = an.tensors[id(out)].axis
            shape = graph.constant(node.inputs[1]).copy()
            if shape[axis] > 0:
                new = _features_after(an, id(out), kept_count)
                if shape[axis] != new:
                    shape[axis] = new
                    graph.set_constant(node, 1, shape)
