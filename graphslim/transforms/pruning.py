"""Structured pruning on top of the channel analysis: importance, selection, physical removal.

Three separate ideas, as in Torch-Pruning: the dependency groups and their units come from
:mod:`graphslim.analysis.channels`; an *importance criterion* (``CRITERIA``) gives one score per
unit of a group (a channel of a CNN layer, an FFN neuron, a whole attention head); and
:func:`apply_pruning` removes the dropped units from every use (weights, biases, per-channel
constants, depthwise groups, Split sizes, Reshape and Expand shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphslim.analysis.channels import ChannelAnalysis, Group, TensorChannels, Use
from graphslim.core.ir import Graph, Node
from graphslim.core.ops import node_macs, op_info

__all__ = [
    "CRITERIA",
    "PruneRequest",
    "Rounding",
    "activation_norms",
    "apply_pruning",
    "estimate_cost",
    "group_scores",
    "keep_counts",
    "prune",
    "select_units",
]


# --------------------------------------------------------------------------- importance


def _is_weight_use(u: Use) -> bool:
    info = op_info(u.node.op, u.node.domain)
    return (
        u.kind in ("out", "in", "group_in")
        and info is not None
        and info.weight is not None
        and (u.index == info.weight.index)
    )


def _position_values(graph: Graph, use: Use, power: int) -> np.ndarray | None:
    """Per index along the use's axis: the L1 (power 1) or squared L2 (power 2) mass of the
    constant slice at that index."""
    w = graph.constant(use.node.inputs[use.index])
    if w is None:
        return None
    # One temporary of the weight's own dtype (big weights matter here), accumulated in float64.
    mag = np.square(w) if power == 2 else np.abs(w)
    if use.kind == "group_in":
        groups = int(use.node.attrs.get("group", 1))
        cout, cpg = mag.shape[0], mag.shape[1]
        return mag.reshape(groups, cout // groups, cpg, -1).sum(axis=(1, 3), dtype=np.float64).reshape(groups * cpg)
    moved = np.moveaxis(mag, use.axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1, dtype=np.float64)


def _channel_values(use: Use, per_position: np.ndarray) -> np.ndarray:
    """Per channel of the use: the sum over the ``rep`` indices it occupies."""
    idx = use.starts[:, None] + np.arange(use.rep)[None, :]
    return per_position[idx].sum(axis=1)


class _UnitScores:
    """Accumulates per-channel values of uses into per-unit scores, each use normalized by its
    mean (a bias or a small layer then weighs as much as a big one, as Torch-Pruning does)."""

    def __init__(self, an: ChannelAnalysis, group: Group):
        self.unit_of: dict[int, np.ndarray] = {}
        for r in group.roots:
            arr = np.full(an.roots[r].size, -1, dtype=np.int64)
            for i, u in enumerate(group.units):
                if r in u:
                    arr[u[r]] = i
            self.unit_of[r] = arr
        self.total = np.zeros(group.size)
        self.count = np.zeros(group.size)

    def add(self, use: Use, values: np.ndarray) -> None:
        units = self.unit_of[use.root][use.chans]
        sums = np.zeros(len(self.total))
        n = np.zeros(len(self.total))
        np.add.at(sums, units, values)
        np.add.at(n, units, 1)
        hit = n > 0
        per = np.where(hit, sums / np.maximum(n, 1), 0.0)
        m = per[hit].mean() if hit.any() else 0.0
        self.total += per / m if m > 0 else per
        self.count += hit

    def result(self) -> np.ndarray:
        return self.total / np.maximum(self.count, 1)


def _norm_criterion(power: int) -> Callable[..., np.ndarray]:
    def score(
        graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator, activations: dict | None = None
    ) -> np.ndarray:
        acc = _UnitScores(an, group)
        for _, u in an.group_uses(group):
            if not _is_weight_use(u):
                continue
            pos = _position_values(graph, u, power)
            if pos is not None:
                vals = _channel_values(u, pos)
                acc.add(u, np.sqrt(vals) if power == 2 else vals)
        return acc.result()

    return score


def _bn_gamma(
    graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator, activations: dict | None = None
) -> np.ndarray | None:
    """Network Slimming (Liu et al., ICCV 2017): |gamma| of the BatchNormalizations on the group."""
    acc = _UnitScores(an, group)
    found = False
    for _, u in an.group_uses(group):
        if u.kind == "param" and u.node.op == "BatchNormalization" and u.index == 1:
            gamma = np.abs(graph.constant(u.node.inputs[1]).astype(np.float64).reshape(-1))
            acc.add(u, _channel_values(u, gamma))
            found = True
    return acc.result() if found else None


def _activation(
    graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator, activations: dict | None = None
) -> np.ndarray | None:
    """Data-driven (Wanda, Sun et al. 2023): for every weight reading the group's channels,
    ||X_c|| (the input activation's L2 norm per channel over the calibration data) times the L1
    norm of the weights that read channel c; producers count their output activation's norm."""
    if not activations:
        return None
    acc = _UnitScores(an, group)
    found = False
    for _, u in an.group_uses(group):
        if not _is_weight_use(u) or u.kind == "group_in":
            continue
        key = (id(u.node), "in" if u.kind == "in" else "out")
        norms = activations.get(key)
        if norms is None or len(norms) * (u.rep if u.kind == "in" else 1) < 1:
            continue
        if u.kind == "in":
            pos = _position_values(graph, u, 1)
            if pos is None or len(norms) != len(pos):
                continue
            vals = _channel_values(u, pos * norms)
        else:
            if len(norms) != an.roots[u.root].size:
                continue
            vals = norms[u.chans]
        acc.add(u, vals)
        found = True
    return acc.result() if found else None


def _random(
    graph: Graph, an: ChannelAnalysis, group: Group, rng: np.random.Generator, activations: dict | None = None
) -> np.ndarray:
    return rng.random(group.size)


#: criterion name -> f(graph, analysis, group, rng, activations) -> one score per unit (None: n/a)
CRITERIA: dict[str, Callable[..., np.ndarray | None]] = {
    "l1": _norm_criterion(1),
    "l2": _norm_criterion(2),
    "bn-gamma": _bn_gamma,
    "activation": _activation,
    "random": _random,
}


def group_scores(
    graph: Graph,
    an: ChannelAnalysis,
    groups: list[Group],
    criterion: str,
    rng: np.random.Generator,
    activations: dict | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Scores per prunable group; groups where the criterion does not apply fall back to l1.
    Returns the scores and how many groups fell back."""
    scores, fallbacks = {}, 0
    for g in groups:
        s = CRITERIA[criterion](graph, an, g, rng, activations)
        if s is None:
            fallbacks += 1
            s = CRITERIA["l1"](graph, an, g, rng)
        scores[g.id] = s
    return scores, fallbacks


def activation_norms(
    graph: Graph, an: ChannelAnalysis, groups: list[Group], data: object, samples: int = 64, batch: int = 8
) -> dict[tuple[int, str], np.ndarray]:
    """Per weight node of the groups: the L2 norm per channel of its input (``"in"``) or output
    (``"out"``) activation over up to ``samples`` samples of ``data``, accumulated batch by batch
    (activations of big layers are never held for the whole set)."""
    from graphslim.core.runtime import run_with_outputs

    wanted: dict[str, tuple[tuple[int, str], int]] = {}  # tensor name -> (key, channel axis)
    for g in groups:
        for _, u in an.group_uses(g):
            if not _is_weight_use(u) or u.kind == "group_in":
                continue
            t = u.node.inputs[0] if u.kind == "in" else u.node.outputs[0]
            tc = an.tensors.get(id(t))
            axis = tc.axis if tc is not None else (graph.rank(t) or 1) - 1
            if u.node.op in ("Conv", "ConvTranspose", "Gemm"):
                axis = 1
            wanted[t.name] = ((id(u.node), "in" if u.kind == "in" else "out"), axis)
    if not wanted:
        return {}
    sums: dict[str, np.ndarray] = {}
    for outs in run_with_outputs(graph.to_model(), data.take(samples), list(wanted), batch=batch):  # type: ignore[attr-defined]
        for name, arr in outs.items():
            axis = wanted[name][1] % arr.ndim
            sq = np.moveaxis(np.square(arr.astype(np.float64)), axis, 0).reshape(arr.shape[axis], -1).sum(axis=1)
            sums[name] = sums.get(name, 0) + sq
    return {wanted[n][0]: np.sqrt(v) for n, v in sums.items()}


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Rounding:
    round_to: int = 1
    min_channels: int = 1

    def keep(self, group: Group, raw: int) -> int:
        """Units to keep: at least min_channels, a multiple of round_to and of the group's
        equal-count classes, at most all of them."""
        m = self.round_to * group.slices // math.gcd(self.round_to, group.slices)
        n = max(raw, self.min_channels, 1)
        n = math.ceil(n / m) * m
        return min(n, group.size)


def keep_counts(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    ratio: float,
    scope: str,
    rounding: Rounding,
    group_ratios: dict[int, float] | None = None,
) -> dict[int, int]:
    """How many units each group keeps at pruning ``ratio`` (``scope=local``: per group, or at
    ``group_ratios[group id]`` where given)."""
    if scope == "local":
        ratios = group_ratios or {}
        return {
            g.id: rounding.keep(g, g.size - int(math.floor(ratios.get(g.id, ratio) * g.size + 1e-9))) for g in groups
        }
    # Global: one ranking of all units by normalized score; ties broken by group, then index.
    entries = [(float(s), g.id, i) for g in groups for i, s in enumerate(scores[g.id])]
    entries.sort()
    n_prune = int(math.floor(ratio * len(entries) + 1e-9))
    pruned: dict[int, int] = {}
    for _, gid, _ in entries[:n_prune]:
        pruned[gid] = pruned.get(gid, 0) + 1
    return {g.id: rounding.keep(g, g.size - pruned.get(g.id, 0)) for g in groups}


def select_units(group: Group, score: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted) of the ``keep`` best units; equal counts per class where the group has
    classes (grouped convolutions, channel shuffles)."""
    if keep >= group.size:
        return np.arange(group.size)
    classes = sorted(set(group.classes))
    per = keep // len(classes)
    kept = []
    for c in classes:
        members = np.array([i for i, k in enumerate(group.classes) if k == c], dtype=np.int64)
        part = score[members]
        order = np.lexsort((members, -part))  # highest score first, lower index on ties
        kept.append(members[order[:per]])
    return np.sort(np.concatenate(kept))


# --------------------------------------------------------------------------- cost estimate


def estimate_cost(graph: Graph, an: ChannelAnalysis, keep: dict[int, int], base: tuple[int, int]) -> tuple[int, int]:
    """(params, MACs) after pruning to ``keep`` counts, without touching the graph.

    ``base`` is the (params, MACs) of the graph as it is. Units of a group are alike, so each
    constant shrinks along a pruned axis by the fraction of units cut; a weight's MACs scale with
    its size."""
    removed: dict[tuple[int, int], dict[int, float]] = {}
    nodes: dict[tuple[int, int], Node] = {}
    for g in an.groups:
        cut = g.size - keep.get(g.id, g.size)
        if cut <= 0:
            continue
        for _, u in an.group_uses(g):
            key = (id(u.node), u.index)
            nodes[key] = u.node
            indices = len(np.unique(u.starts)) * u.rep
            per_axis = removed.setdefault(key, {})
            axis = 1 if u.kind == "group_in" else u.axis
            per_axis[axis] = per_axis.get(axis, 0.0) + indices * cut / g.size
    params, macs = base
    for key, per_axis in removed.items():
        node = nodes[key]
        val = graph.constant(node.inputs[key[1]])
        frac = 1.0
        for axis, n in per_axis.items():
            frac *= max(val.shape[axis] - n, 0) / val.shape[axis]
        params -= int(round(val.size * (1 - frac)))
        info = op_info(node.op, node.domain)
        if info is not None and info.weight is not None and key[1] == info.weight.index and node.op != "Gather":
            m, _ = node_macs(graph, node)
            macs -= int(round(m * (1 - frac)))
    return params, macs


# --------------------------------------------------------------------------- removal


def apply_pruning(graph: Graph, an: ChannelAnalysis, kept: dict[int, np.ndarray]) -> int:
    """Remove every unit not in ``kept[group]`` from the graph. Returns channels removed."""
    dropped: dict[int, np.ndarray] = {}  # root -> dropped root channels
    for g in an.groups:
        keep = kept.get(g.id)
        if keep is None or len(keep) >= g.size:
            continue
        for i in np.setdiff1d(np.arange(g.size), keep):
            for r, ch in g.units[i].items():
                dropped[r] = np.concatenate([dropped.get(r, np.zeros(0, np.int64)), ch])
    deletions: dict[tuple[int, int], tuple[Node, dict[int, set[int]]]] = {}
    group_in: list[tuple[Use, np.ndarray]] = []
    for r, chans in dropped.items():
        for u in an.uses.get(r, []):
            hit = np.isin(u.chans, chans)
            if not hit.any():
                continue
            idx = (u.starts[hit][:, None] + np.arange(u.rep)[None, :]).reshape(-1)
            if u.kind == "group_in":
                group_in.append((u, idx))
                continue
            entry = deletions.setdefault((id(u.node), u.index), (u.node, {}))
            entry[1].setdefault(u.axis, set()).update(idx.tolist())
    # Grouped-conv columns first: they index the original per-group layout.
    for u, drop in _merge_group_in(group_in):
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
    _fixups(graph, an, dropped)
    return int(sum(len(c) for c in dropped.values()))


def _merge_group_in(items: list[tuple[Use, np.ndarray]]) -> list[tuple[Use, list[int]]]:
    merged: dict[tuple[int, int], tuple[Use, set[int]]] = {}
    for u, idx in items:
        entry = merged.setdefault((id(u.node), u.index), (u, set()))
        entry[1].update(idx.tolist())
    return [(u, sorted(s)) for u, s in merged.values()]


def _after(tc: TensorChannels, dropped: dict[int, np.ndarray]) -> tuple[int, int]:
    """(positions, channels per block) of a channel map once ``dropped`` channels are gone."""
    positions, per_block = 0, None
    for p in tc.pieces:
        gone = dropped.get(p.root)
        keep = np.ones(len(p.chans), dtype=bool) if gone is None else ~np.isin(p.chans, gone)
        blocks = keep.reshape(-1, p.block)
        alive = blocks.any(axis=1)
        positions += int(alive.sum()) * p.rep
        if p.block > 1 and alive.any():
            per_block = int(blocks[alive][0].sum())
    return positions, per_block if per_block is not None else tc.block


def _fixups(graph: Graph, an: ChannelAnalysis, dropped: dict[int, np.ndarray]) -> None:
    touched = set(dropped)
    for kind, node in an.fixups:
        if kind == "expand":  # a constant broadcast by Expand (a class token): follow its new shape
            c = graph.constant(node.inputs[0])
            rank = len(graph.shape(node.outputs[0]) or ())
            if c is not None and rank:
                entries = {rank - c.ndim + k: d for k, d in enumerate(c.shape) if d > 1}
                _rewrite_shape(graph, node, 1, entries, rank)
            continue
        if kind == "shuffle":  # [.., C, ..] -> [.., groups, C/groups, ..]: C/groups follows
            x = an.tensors.get(id(node.inputs[0]))
            if x is not None and x.roots() & touched:
                groups = (graph.shape(node.outputs[0]) or ())[x.axis]
                positions, _ = _after(x, dropped)
                _rewrite_shape(
                    graph, node, 1, {x.axis + 1: positions // int(groups)}, len(graph.shape(node.outputs[0]) or ())
                )
            continue
        if kind == "depthwise":
            w = graph.constant(node.inputs[1])
            if int(node.attrs.get("group", 1)) != w.shape[0]:
                graph.set_attr(node, "group", int(w.shape[0]))
            continue
        out = an.tensors.get(id(node.outputs[0]))
        if out is None or not (out.roots() & touched):
            continue
        if kind == "split":
            sizes = np.array([_after(an.tensors[id(o)], dropped)[0] for o in node.outputs], dtype=np.int64)
            old = graph.constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
            if old is not None and not np.array_equal(old, sizes):
                graph.set_constant(node, 1, sizes)
            elif old is None and "split" in node.attrs:
                graph.set_attr(node, "split", sizes.tolist())
        elif kind in ("reshape", "expand_shape"):
            positions, per_block = _after(out, dropped)
            entries = {out.axis: positions}
            if out.inner is not None and out.block > 1:
                entries[out.inner] = per_block
            _rewrite_shape(graph, node, 1, entries, len(graph.shape(node.outputs[0]) or ()))


def _rewrite_shape(graph: Graph, node: Node, index: int, entries: dict[int, int], rank: int) -> None:
    """Set explicit (positive) entries of the shape input ``index`` of ``node`` to the new sizes.
    The shape is a constant, or a Concat of 1-D pieces of which the entries may be constants;
    -1, 0 and entries computed at run time are left as they are (they follow the pruned tensors)."""
    shape_t = node.inputs[index]
    shape = graph.constant(shape_t)
    if shape is not None:
        new = shape.copy()
        offset = rank - new.size  # Expand aligns its shape from the right
        for axis, value in entries.items():
            k = axis - offset
            if 0 <= k < new.size and new[k] > 1:
                new[k] = value
        if not np.array_equal(new, shape):
            graph.set_constant(node, index, new)
        return
    prod = graph.producer(shape_t)
    if prod is None or prod.op != "Concat":
        return
    pos = 0
    for i, t in enumerate(prod.inputs):
        n = (graph.shape(t) or (None,))[0]
        if not isinstance(n, int):
            return
        c = graph.constant(t)
        if c is not None:
            new = c.reshape(-1).copy()
            for axis, value in entries.items():
                if pos <= axis < pos + n and new[axis - pos] > 1:
                    new[axis - pos] = value
            if not np.array_equal(new, c.reshape(-1)):
                graph.set_constant(prod, i, new.reshape(c.shape))
        pos += n


# --------------------------------------------------------------------------- the shared driver


@dataclass(frozen=True)
class PruneRequest:
    """What prune-channels, prune-heads and prune-hidden share: which groups, how much, by what."""

    kinds: frozenset[str]  # group kinds this pass prunes ("channels", "heads", "hidden")
    ratio: float
    criterion: str  # a CRITERIA name, or "auto": activation with data, else l2
    scope: str = "local"
    round_to: int = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    target_macs: float | None = None
    target_params: float | None = None
    samples: int = 64  # calibration samples for the activation criterion
    unit_name: str = "channels"  # what the stats call a unit ("channels", "heads")
    # (producer node name, ratio): a group any of whose producers is named here prunes at that
    # ratio instead of ``ratio`` (scope=local only; what a searched recipe writes per group)
    layer_ratios: tuple[tuple[str, float], ...] = ()


_OTHER_PASS = {
    "heads": "attention heads: prune-heads takes them",
    "hidden": "the hidden dimension: prune-hidden takes it",
    "channels": "plain channels: prune-channels takes them",
}


def _prunable_groups(an: ChannelAnalysis, req: PruneRequest) -> tuple[list[Group], list[tuple[str, str]]]:
    """The groups of ``req.kinds`` this request may prune, and (where, why) for those it may not."""
    skipped: list[tuple[str, str]] = []
    groups: list[Group] = []
    excluded = set(req.exclude)
    for g in an.groups:
        names = [an.roots[r].origin for r in g.roots]
        where = f"group {g.id} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
        if g.size <= 1:
            continue
        if g.frozen:
            skipped.append((where, "; ".join(sorted(set(g.frozen))[:3])))
        elif g.kind not in req.kinds:
            if g.kind != "channels" or "channels" not in req.kinds:
                skipped.append((where, _OTHER_PASS[g.kind]))
        elif excluded & set(names):
            skipped.append((where, "excluded by the exclude option"))
        else:
            groups.append(g)
    return groups, skipped


def prune(
    graph: Graph,
    an: ChannelAnalysis,
    req: PruneRequest,
    *,
    data: object = None,
    rng: np.random.Generator | None = None,
    base: tuple[int, int] | None = None,
) -> tuple[int, dict, list[tuple[str, str]]]:
    """Select and remove units of the groups of ``req.kinds``. Returns (channels removed, stats,
    skipped as (where, why) pairs)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    groups, skipped = _prunable_groups(an, req)
    criterion = req.criterion
    if criterion == "auto":
        criterion = "activation" if data is not None else "l2"
    activations = None
    if criterion == "activation":
        if data is None:
            raise ValueError("criterion=activation needs calibration data (--data)")
        activations = activation_norms(graph, an, groups, data, samples=req.samples)
    group_ratios, unmatched = _group_ratios(an, groups, dict(req.layer_ratios))
    for name in unmatched:
        skipped.append((name, "layer_ratios names no prunable group of this pass (a group is named by its producers)"))
    rounding = Rounding(req.round_to, req.min_channels)
    scores, fallbacks = group_scores(graph, an, groups, criterion, rng, activations)
    stats: dict = {"groups": len(an.groups), "prunable_groups": len(groups), "criterion": criterion}
    if fallbacks:
        stats["criterion_fallbacks_to_l1"] = fallbacks
    if req.target_macs is not None or req.target_params is not None:
        if base is None:
            raise ValueError("a target needs the model's current (params, MACs)")
        ratio, reached = _search_ratio(graph, an, groups, scores, rounding, req, base)
        stats["searched_ratio"] = round(ratio, 6)
        stats["target_reached"] = reached
        if not reached:
            skipped.append(("model", "the target cannot be met: every prunable group is at its minimum"))
        counts = keep_counts(groups, scores, ratio, "global", rounding)
    else:
        counts = keep_counts(groups, scores, req.ratio, req.scope, rounding, group_ratios)
    kept = {g.id: select_units(g, scores[g.id], counts[g.id]) for g in groups}
    before = sum(g.size for g in groups)
    after = sum(len(kept[g.id]) for g in groups)
    removed = apply_pruning(graph, an, kept) if after < before else 0
    u = req.unit_name
    stats.update(
        {
            f"{u}_before": before,
            f"{u}_after": after,
            f"{u}_removed": before - after,
            "weight_channels_removed": removed,
            "pruned_groups": [
                {
                    "group": g.id,
                    "kind": g.kind,
                    "members": [an.roots[r].origin for r in g.roots],
                    u: [g.size, len(kept[g.id])],
                    "channels_per_unit": max((len(c) for c in g.units[0].values()), default=1),
                    "approximate": sorted(set(g.approx))[:3],
                }
                for g in groups
                if len(kept[g.id]) < g.size
            ],
        }
    )
    return removed, stats, skipped


def _group_ratios(
    an: ChannelAnalysis, groups: list[Group], by_name: dict[str, float]
) -> tuple[dict[int, float], list[str]]:
    """Group id -> ratio for the prunable ``groups`` one of whose producers ``by_name`` names; and
    the names that match no group at all (frozen, excluded or other-kind groups are skipped with
    their own reason). Two names of one group with different ratios are an error."""
    out: dict[int, float] = {}
    used: set[str] = set()
    prunable = {g.id for g in groups}
    for g in an.groups:
        named = [(n, by_name[n]) for n in (an.roots[r].origin for r in g.roots) if n in by_name]
        used.update(n for n, _ in named)
        if not named or g.id not in prunable:
            continue
        if len({v for _, v in named}) > 1:
            raise ValueError(
                "layer_ratios gives one group different ratios: " + ", ".join(f"{n}={v:g}" for n, v in named)
            )
        out[g.id] = named[0][1]
    return out, sorted(set(by_name) - used)


def _search_ratio(
    graph: Graph,
    an: ChannelAnalysis,
    groups: list[Group],
    scores: dict[int, np.ndarray],
    rounding: Rounding,
    req: PruneRequest,
    base: tuple[int, int],
) -> tuple[float, bool]:
    """Smallest global ratio whose pruned model meets the target (bisection on exact estimates)."""
    use_macs = req.target_macs is not None
    target = req.target_macs if use_macs else req.target_params
    goal = target * (base[1] if use_macs else base[0])  # type: ignore[operator]

    def meets(ratio: float) -> bool:
        params, macs = estimate_cost(graph, an, keep_counts(groups, scores, ratio, "global", rounding), base)
        return (macs if use_macs else params) <= goal

    hi = 0.999
    if not meets(hi):
        return hi, False
    lo = 0.0
    if meets(lo):
        return lo, True
    for _ in range(40):
        mid = (lo + hi) / 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi, True
