"""Channel dependency analysis: which channels of which weights must be pruned together.

Every weight op of the op table with a constant weight (Conv, ConvTranspose, Gemm, MatMul, and
Gather from an embedding table) starts a *root*: its output channels. Channels then flow forward;
each tensor gets a channel map (:class:`TensorChannels`): the axis that carries channels and, along
it, *pieces* of roots: which root channels lie there in which order (``chans``), how many root
channels one position holds (``block``: an attention head holds ``head_dim`` channels after the
Reshape to ``[B, S, heads, head_dim]``) and how many consecutive positions repeat one block
(``rep``: H*W features per channel after a Flatten, or the query heads sharing one key/value head
in grouped-query attention).

Ops couple channels: a residual Add ties channel ``i`` of both operands, the QK^T MatMul ties the
query heads to the key heads (``j`` to ``j // n_rep`` under grouped-query attention), a Concat
lays pieces side by side, a channel shuffle permutes them. Couplings are kept per channel in one
union-find; its components are the *units* that prune together (one channel of each coupled
weight, or a whole head of Q, K, V and the output projection's rows), and the weights they touch
form a :class:`Group`. The uses of a unit are every constant indexed by its channels: producer
weight rows and biases (``out``), consumer weight columns (``in``), per-channel constants (``param``),
grouped-conv columns (``group_in``); the shape constants of Reshape, Split and depthwise groups
are fixed up after pruning.

What the analysis does not understand freezes the roots that reach it, with a reason (an op
without a rule, a graph output, a Softmax over the channels), so it can be incomplete but never
wrong. Pruning some groups is *approximate*: a LayerNormalization or RMSNorm over the channels
(the hidden dimension of a transformer) computes its statistics over fewer channels afterwards;
such groups carry the reason in ``approx`` and only ``prune-hidden`` takes them.

Integer and boolean tensors (shapes, token ids, masks) never carry channels. The rules per op come
from the op table (:mod:`graphslim.core.ops`); this module has one handler per rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphslim.core.ir import Graph, Node, Tensor
from graphslim.core.ops import Rule, op_info, weight_node

__all__ = ["ChannelAnalysis", "Group", "Piece", "Root", "TensorChannels", "Use", "channel_groups"]


# --------------------------------------------------------------------------- data model


@dataclass
class Root:
    """The output channels of one weight op (or a frozen stand-in)."""

    id: int
    size: int
    base: int  # global id of its channel 0 in the union-find
    producer: Node | None
    origin: str  # a node or tensor name, for messages
    frozen: list[str] = field(default_factory=list)
    approx: list[str] = field(default_factory=list)
    heads: bool = False  # its channels form blocks that prune whole (attention heads)


@dataclass(frozen=True, eq=False)
class Piece:
    """Root channels ``chans`` laid along an axis: each position holds ``block`` consecutive
    entries of ``chans``, and each block fills ``rep`` consecutive positions."""

    root: int
    chans: np.ndarray
    block: int = 1
    rep: int = 1

    @property
    def blocks(self) -> int:
        return len(self.chans) // self.block

    @property
    def positions(self) -> int:
        return self.blocks * self.rep

    def same(self, other: Piece) -> bool:
        return (self.root, self.block, self.rep) == (other.root, other.block, other.rep) and np.array_equal(
            self.chans, other.chans
        )


@dataclass(frozen=True, eq=False)
class TensorChannels:
    """The channel map of one tensor: ``axis`` carries ``pieces``; ``inner`` is the axis that
    holds the index inside a block (``head_dim`` after a head split), when blocks exist."""

    axis: int
    pieces: tuple[Piece, ...]
    inner: int | None = None

    @property
    def positions(self) -> int:
        return sum(p.positions for p in self.pieces)

    @property
    def block(self) -> int:
        return max((p.block for p in self.pieces), default=1)

    def roots(self) -> set[int]:
        return {p.root for p in self.pieces}

    def same(self, other: TensorChannels) -> bool:
        return (
            (self.axis, self.inner) == (other.axis, other.inner)
            and len(self.pieces) == len(other.pieces)
            and all(a.same(b) for a, b in zip(self.pieces, other.pieces, strict=True))
        )

    def moved(self, axis: int, inner: int | None = -1) -> TensorChannels:
        return TensorChannels(axis, self.pieces, self.inner if inner == -1 else inner)

    def position_channels(self) -> tuple[np.ndarray, np.ndarray]:
        """For every position: the root and one root channel of its block (the block's first)."""
        roots, chans = [], []
        for p in self.pieces:
            firsts = p.chans[:: p.block] if p.block > 1 else p.chans
            roots.append(np.full(p.positions, p.root, dtype=np.int64))
            chans.append(np.repeat(firsts, p.rep))
        if not roots:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(roots), np.concatenate(chans)


@dataclass
class Use:
    """A constant input of a node indexed by a root's channels along ``axis``: channel
    ``chans[i]`` occupies indices ``starts[i] .. starts[i] + rep - 1``.

    kind: ``out`` (producer weights/bias), ``in`` (consumer weights), ``param`` (per-channel
    constants such as BatchNorm statistics or LayerNorm scales), ``group_in`` (grouped-conv weight
    columns, which index the per-group layout)."""

    kind: str
    node: Node
    index: int
    axis: int
    root: int
    chans: np.ndarray
    starts: np.ndarray
    rep: int


@dataclass
class Group:
    """Roots whose channels are coupled, and the units they prune in."""

    id: int
    roots: list[int]
    units: list[dict[int, np.ndarray]]  # per unit: root id -> its (sorted) root channels
    classes: list[tuple[int, ...]]  # per unit: equal-count class (pruning keeps classes equal)
    frozen: list[str]
    approx: list[str]
    heads: bool = False  # units are whole attention heads

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def slices(self) -> int:
        return len(set(self.classes)) or 1

    @property
    def kind(self) -> str:
        return "heads" if self.heads else ("hidden" if self.approx else "channels")


@dataclass
class ChannelAnalysis:
    roots: list[Root]
    tensors: dict[int, TensorChannels]  # id(tensor) -> channels
    names: dict[int, str]  # id(tensor) -> name
    uses: dict[int, list[Use]]  # root id -> uses
    fixups: list[tuple[str, Node]]  # ("depthwise" | "split" | "reshape" | "expand", node)
    groups: list[Group]
    group_of: dict[int, int]  # root id -> group id

    def group_uses(self, g: Group) -> list[tuple[int, Use]]:
        return [(r, u) for r in g.roots for u in self.uses.get(r, [])]

    def layer_types(self, graph: Graph) -> dict[int, str]:
        """id(node) -> "attention", "ffn" or "embeddings" for the nodes of a transformer: nodes
        that produce, read or compute on attention heads (Q/K/V and output projections, QK^T,
        Softmax, scores x V), nodes that produce or read an FFN inner dimension (a plain group),
        embedding lookups. Empty for models without attention heads."""
        heads = {g.id for g in self.groups if g.heads}
        if not heads:
            return {}
        # An FFN inner dimension: a plain group that weights both produce and read.
        ffn = {
            g.id
            for g in self.groups
            if g.kind == "channels" and {u.kind for _, u in self.group_uses(g)} >= {"out", "in"}
        }
        kind_of = {
            r: ("attention" if self.group_of.get(r) in heads else "ffn" if self.group_of.get(r) in ffn else None)
            for r in range(len(self.roots))
        }
        out: dict[int, str] = {}
        for node in graph.nodes:
            if node.op == "Gather" and any(r.producer is node for r in self.roots):
                out[id(node)] = "embeddings"
                continue
            kinds = {
                kind_of[r]
                for t in [*node.inputs, *node.outputs]
                if (tc := self.tensors.get(id(t))) is not None
                for r in tc.roots()
            }
            if "attention" in kinds:
                out[id(node)] = "attention"
            elif "ffn" in kinds:
                out[id(node)] = "ffn"
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Groups as plain data (for ``inspect --groups`` and the report)."""
        out = []
        for g in self.groups:
            members = []
            for r in g.roots:
                root = self.roots[r]
                uses = sorted({f"{u.node.name}:{u.kind}" for u in self.uses.get(r, [])})
                members.append({"root": root.origin, "uses": uses})
            why = sorted(set(g.frozen)) if g.frozen else ([] if g.size > 1 else ["single channel"])
            out.append(
                {
                    "group": g.id,
                    "kind": g.kind,
                    "channels": g.size,
                    "prunable": g.prunable,
                    "prunable_channels": g.size - g.slices if g.prunable else 0,
                    "why_not": why,
                    "approximate": sorted(set(g.approx)),
                    "slices": g.slices,
                    "members": members,
                }
            )
        return out


# --------------------------------------------------------------------------- the analyzer


class _UnionFind:
    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def grow(self, n: int) -> int:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return start

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return int(root)

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots_of(self, xs: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(x)) for x in xs], dtype=np.int64)


class _Analyzer:
    def __init__(self, graph: Graph):
        self.g = graph
        self.roots: list[Root] = []
        self.uf = _UnionFind()
        self.tc: dict[int, TensorChannels] = {}
        self.names: dict[int, str] = {}
        self.uses: dict[int, list[Use]] = {}
        self.fixups: list[tuple[str, Node]] = []
        # Equal-count constraints: per root, an array mapping its channels to a class (-1: none);
        # pruning must keep as many channels in every class (grouped convolutions, head blocks).
        self.partitions: list[tuple[dict[int, np.ndarray], bool]] = []  # (root -> classes, soft)

    # ---- roots and channel maps
    def new_root(self, size: int, producer: Node | None, origin: str, frozen: str | None = None) -> int:
        rid = len(self.roots)
        base = self.uf.grow(size)
        self.roots.append(Root(rid, size, base, producer, origin, [frozen] if frozen else []))
        return rid

    def whole(self, rid: int, axis: int) -> TensorChannels:
        return TensorChannels(axis, (Piece(rid, np.arange(self.roots[rid].size, dtype=np.int64)),))

    def set(self, t: Tensor, tc: TensorChannels | None) -> None:
        if tc is not None and self.carries(t):
            self.tc[id(t)] = tc
            self.names[id(t)] = t.name

    def get(self, t: Tensor) -> TensorChannels | None:
        return self.tc.get(id(t))

    @staticmethod
    def carries(t: Tensor) -> bool:
        """Only float tensors carry channels (not shapes, indices or masks)."""
        return t.dtype is None or np.dtype(t.dtype).kind == "f"

    def freeze(self, tc: TensorChannels | None, reason: str) -> None:
        if tc is None:
            return
        for r in tc.roots():
            self.roots[r].frozen.append(reason)

    def approximate(self, tc: TensorChannels | None, reason: str) -> None:
        if tc is None:
            return
        for r in tc.roots():
            self.roots[r].approx.append(reason)

    def freeze_inputs(self, node: Node, reason: str | None = None) -> None:
        why = reason or f"read by {node.op} node '{node.name}', which pruning does not handle"
        for t in node.inputs:
            self.freeze(self.get(t), why)

    def atomic(self, tc: TensorChannels | None) -> None:
        """Make every block of ``tc`` prune as one unit (an op works inside the blocks)."""
        if tc is None:
            return
        for p in tc.pieces:
            if p.block > 1:
                self.roots[p.root].heads = True
                base = self.roots[p.root].base
                chans = p.chans.reshape(-1, p.block)
                self.uf.union_pairs(base + np.repeat(chans[:, 0], p.block - 1), base + chans[:, 1:].reshape(-1))

    def use(self, kind: str, node: Node, index: int, axis: int, tc: TensorChannels, rep: int = 1) -> None:
        """Record that constant input ``index`` of ``node`` is indexed by ``tc``'s positions along
        ``axis`` (each position ``rep`` entries wide)."""
        if tc.block > 1:
            self.atomic(tc)
        pos = 0
        for p in tc.pieces:
            starts = pos + np.repeat(np.arange(p.blocks, dtype=np.int64) * p.rep, p.block)
            self.uses.setdefault(p.root, []).append(
                Use(kind, node, index, axis, p.root, p.chans, starts * rep, p.rep * rep)
            )
            pos += p.positions

    def couple(self, a: TensorChannels, b: TensorChannels, where: str) -> bool:
        """Tie the channels at equal positions of two channel maps. False (and both frozen) if
        their positions differ."""
        if a.same(b):
            return True
        if a.positions != b.positions:
            reason = f"channels of the operands of '{where}' do not line up"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return False
        if a.block > 1 or b.block > 1:
            self.atomic(a)
            self.atomic(b)
        ra, ca = a.position_channels()
        rb, cb = b.position_channels()
        bases = np.array([r.base for r in self.roots], dtype=np.int64)
        self.uf.union_pairs(bases[ra] + ca, bases[rb] + cb)
        return True

    def partition(self, tc: TensorChannels, classes: int, where: str, *, soft: bool = False) -> bool:
        """Constrain ``tc``'s channels to keep equal counts in ``classes`` equal consecutive parts
        of its positions (a grouped convolution reading them, a reshape into blocks). A ``soft``
        constraint lapses where each part turns out to prune as one unit."""
        if tc.positions % classes:
            self.freeze(tc, f"'{where}' needs {classes} equal parts of {tc.positions} channels")
            return False
        per = tc.positions // classes
        roots, chans = tc.position_channels()
        cls = np.arange(tc.positions) // per
        part: dict[int, np.ndarray] = {}
        for r in set(roots.tolist()):
            arr = np.full(self.roots[r].size, -1, dtype=np.int64)
            sel = roots == r
            arr[chans[sel]] = cls[sel]
            part[r] = arr
        self.partitions.append((part, soft))
        return True

    # ---- the walk
    def run(self) -> ChannelAnalysis:
        g = self.g
        g.toposort()
        for node in g.nodes:
            info = op_info(node.op, node.domain)
            handler = _HANDLERS.get(info.channels) if info is not None else None
            if handler is None:
                self.freeze_inputs(node)
                continue
            try:
                handler(self, node)
            except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError) as e:
                # A malformed node (a weight of the wrong rank, an odd attribute): never prune near it.
                self.freeze_inputs(node, f"{node.op} '{node.name}' could not be analyzed ({type(e).__name__}: {e})")
                for o in node.outputs:
                    self.tc.pop(id(o), None)
        for t in g.outputs:
            self.freeze(self.get(t), f"reaches graph output '{t.name}'")
        return self._finish()

    def _finish(self) -> ChannelAnalysis:
        n_roots = len(self.roots)
        owner = np.zeros(len(self.uf.parent), dtype=np.int64)
        for r in self.roots:
            owner[r.base : r.base + r.size] = r.id
        comp = self.uf.roots_of(np.arange(len(self.uf.parent)))
        # Roots sharing a component form a group.
        rf = _RootUnion(n_roots)
        first: dict[int, int] = {}
        for ch, c in enumerate(comp.tolist()):
            r = int(owner[ch])
            if c in first:
                rf.union(first[c], r)
            else:
                first[c] = r
        for part, _ in self.partitions:  # roots whose counts must match prune together
            rs = sorted(part)
            for r in rs[1:]:
                rf.union(rs[0], r)
        members: dict[int, list[int]] = {}
        for r in range(n_roots):
            members.setdefault(rf.find(r), []).append(r)
        groups: list[Group] = []
        group_of: dict[int, int] = {}
        for key in sorted(members):
            rids = members[key]
            group = self._group(len(groups), rids, comp, owner)
            groups.append(group)
            for r in rids:
                group_of[r] = group.id
        return ChannelAnalysis(self.roots, self.tc, self.names, self.uses, self.fixups, groups, group_of)

    def _group(self, gid: int, rids: list[int], comp: np.ndarray, owner: np.ndarray) -> Group:
        by_comp: dict[int, dict[int, list[int]]] = {}
        for r in rids:
            root = self.roots[r]
            for c in range(root.size):
                by_comp.setdefault(int(comp[root.base + c]), {}).setdefault(r, []).append(c)
        units = [{r: np.array(ch, dtype=np.int64) for r, ch in u.items()} for _, u in sorted(by_comp.items())]
        frozen = [f for r in rids for f in self.roots[r].frozen]
        approx = [a for r in rids for a in self.roots[r].approx]
        classes: list[tuple[int, ...]] = [() for _ in units]
        for part, soft in self.partitions:
            if not set(part) & set(rids):
                continue
            per_unit = [_unit_classes(part, u) for u in units]
            if _spread_evenly(per_unit) or soft and _within_units(per_unit):
                continue
            for i, counts in enumerate(per_unit):
                if len(counts) > 1:
                    frozen.append("a channel unit spans several parts of a grouped or shuffled layout")
                classes[i] += (next(iter(counts)) if len(counts) == 1 else -2 if counts else -1,)
        counts: dict[tuple[int, ...], int] = {}
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
        if len(set(counts.values())) > 1:
            frozen.append("the parts of a grouped or shuffled layout hold different channel counts")
        if not any(u.kind == "out" for r in rids for u in self.uses.get(r, [])):
            frozen.append("no weight produces these channels")
        return Group(gid, rids, units, classes, frozen, approx, any(self.roots[r].heads for r in rids))


def _unit_classes(part: dict[int, np.ndarray], unit: dict[int, np.ndarray]) -> dict[int, int]:
    """class -> how many of the unit's channels (over the partition's roots) fall in it."""
    out: dict[int, int] = {}
    for r, arr in part.items():
        for c in arr[unit[r]].tolist() if r in unit else ():
            if c >= 0:
                out[c] = out.get(c, 0) + 1
    return out


def _within_units(per_unit: list[dict[int, int]]) -> bool:
    """Every class lies inside one unit (the blocks prune whole: attention heads)."""
    owner: dict[int, int] = {}
    for i, counts in enumerate(per_unit):
        for c in counts:
            if owner.setdefault(c, i) != i:
                return False
    return True


def _spread_evenly(per_unit: list[dict[int, int]]) -> bool:
    """Every unit has as many channels in each class (a shuffle's units take one channel from
    every group), so any choice of units keeps the classes equal."""
    classes = {c for counts in per_unit for c in counts}
    if len(classes) < 2:
        return True
    return all(not counts or (set(counts) == classes and len(set(counts.values())) == 1) for counts in per_unit)


class _RootUnion:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# --------------------------------------------------------------------------- helpers


def _has(node: Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


def _dim(g: Graph, t: Tensor, axis: int) -> int | str | None:
    shp = g.shape(t)
    if shp is None or not -len(shp) <= axis < len(shp):
        return None
    return shp[axis]


def _const_source(g: Graph, t: Tensor) -> tuple[Node, int, np.ndarray] | None:
    """(node, input index, value) when ``t`` is a constant, or a constant passed through Expand,
    Cast or Identity (a ViT class token broadcast to the batch): where a per-channel slice of it
    must be taken. Dims align from the right through all of these."""
    node: Node | None = None
    index = 0
    cur = t
    for _ in range(4):
        val = g.constant(cur)
        if val is not None:
            return (node, index, val) if node is not None else None
        prod = g.producer(cur)
        if prod is None or prod.op not in ("Expand", "Cast", "Identity") or len(g.consumers(cur)) > 1:
            return None
        node, index, cur = prod, 0, prod.inputs[0]
    return None


def _aligned(axis: int, rank: int, out_rank: int) -> int:
    return axis + out_rank - rank


# --------------------------------------------------------------------------- op handlers (one per rule)

Handler = Callable[[_Analyzer, Node], None]
_HANDLERS: dict[str, Handler] = {}


def _rule(*rules: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for r in rules:
            _HANDLERS[r] = fn
        return fn

    return deco


@_rule(Rule.WEIGHT)
def _weight(an: _Analyzer, node: Node) -> None:
    g = an.g
    w = weight_node(g, node)
    x = an.get(node.inputs[0])
    bias_ok = not _has(node, 2) or g.constant(node.inputs[2]) is not None
    if w is None or node.op not in ("Conv", "ConvTranspose", "Gemm") or not bias_ok or w.ndim < 2:
        why = f"{node.op} '{node.name}' has non-constant weights (or an unsupported form)"
        an.freeze(x, why)
        _fresh_output(an, node, 1, why)
        return
    if node.op == "Conv":
        _conv(an, node, w, x)
    elif node.op == "ConvTranspose":
        _conv_transpose(an, node, w, x)
    else:
        _gemm(an, node, w, x)


def _fresh_output(an: _Analyzer, node: Node, axis: int, reason: str | None) -> None:
    t = node.outputs[0]
    d = _dim(an.g, t, axis)
    if isinstance(d, int) and d > 0 and an.carries(t):
        rid = an.new_root(d, node if reason is None else None, t.name, reason)
        an.set(t, an.whole(rid, axis))


def _out_root(
    an: _Analyzer, node: Node, size: int, out_axis: int, bias_axis: int, axis: int, frozen: str | None = None
) -> int:
    rid = an.new_root(size, node if frozen is None else None, node.name or node.outputs[0].name, frozen)
    whole = an.whole(rid, 0)
    an.use("out", node, 1, out_axis, whole)
    if _has(node, 2):
        b = an.g.constant(node.inputs[2])
        if b is not None and b.size == size and size > 1:
            an.use("out", node, 2, b.ndim - 1 if bias_axis == -1 else bias_axis, whole)
    an.set(node.outputs[0], an.whole(rid, axis))
    return rid


def _conv(an: _Analyzer, node: Node, w: np.ndarray, x: TensorChannels | None) -> None:
    groups = int(node.attrs.get("group", 1))
    cout, cin = w.shape[0], w.shape[1] * groups
    if x is not None and (x.axis != 1 or x.block > 1):
        an.freeze(x, f"Conv '{node.name}' reads channels on another axis")
        x = None
    if groups == 1:
        if x is not None:
            an.use("in", node, 1, 1, x)
        _out_root(an, node, cout, 0, 0, 1)
        return
    if groups == cin == cout:  # depthwise: channel i in, channel i out
        if x is None:
            _fresh_output(an, node, 1, f"input of depthwise Conv '{node.name}' is not analyzable")
            return
        an.use("param", node, 1, 0, x)
        if _has(node, 2):
            an.use("param", node, 2, 0, x)
        an.fixups.append(("depthwise", node))
        an.set(node.outputs[0], x)
        return
    if cout % groups or cin % groups:
        why = f"Conv '{node.name}' has an uneven group split"
        an.freeze(x, why)
        _fresh_output(an, node, 1, why)
        return
    # General grouped conv: each group reads cin/groups channels; counts stay equal per group.
    if x is not None and an.partition(x, groups, node.name):
        an.use("group_in", node, 1, 1, x)
    frozen = None if cout > groups else f"grouped Conv '{node.name}' has one channel per group"
    rid = _out_root(an, node, cout, 0, 0, 1, frozen)
    an.partition(an.whole(rid, 1), groups, node.name)


def _conv_transpose(an: _Analyzer, node: Node, w: np.ndarray, x: TensorChannels | None) -> None:
    if int(node.attrs.get("group", 1)) != 1 or "output_shape" in node.attrs:
        why = f"ConvTranspose '{node.name}' is grouped or has a fixed output_shape"
        an.freeze(x, why)
        _fresh_output(an, node, 1, why)
        return
    if x is not None:
        if x.axis == 1 and x.block == 1:
            an.use("in", node, 1, 0, x)
        else:
            an.freeze(x, f"ConvTranspose '{node.name}' reads channels on another axis")
    _out_root(an, node, w.shape[1], 1, 0, 1)


def _gemm(an: _Analyzer, node: Node, w: np.ndarray, x: TensorChannels | None) -> None:
    trans_b = int(node.attrs.get("transB", 0))
    if x is not None:
        if x.axis == 1 and x.block == 1:
            an.use("in", node, 1, 1 if trans_b else 0, x)
        else:
            an.freeze(x, f"Gemm '{node.name}' reads features on another axis")
    n = w.shape[0] if trans_b else w.shape[1]
    c = an.g.constant(node.inputs[2]) if _has(node, 2) else None
    why = None
    if c is not None and c.size > 1 and not (c.ndim >= 1 and c.shape[-1] == n and c.size == n):
        why = f"Gemm '{node.name}' has a bias that is not per output feature"
    _out_root(an, node, n, 0 if trans_b else 1, -1, 1, why)


@_rule(Rule.MATMUL)
def _matmul(an: _Analyzer, node: Node) -> None:
    g = an.g
    a_t, b_t = node.inputs[0], node.inputs[1]
    ra, rb, ro = g.rank(a_t), g.rank(b_t), g.rank(node.outputs[0])
    a, b = an.get(a_t), an.get(b_t)
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        an.freeze_inputs(node, f"MatMul '{node.name}' has operands of unknown or vector rank")
        return
    w = weight_node(g, node)
    if w is not None:
        if w.ndim != 2:
            an.freeze(a, f"MatMul '{node.name}' has a batched constant weight")
            _fresh_output(an, node, ro - 1, f"MatMul '{node.name}' has a batched constant weight")
            return
        if a is not None:
            if a.axis == ra - 1:
                an.use("in", node, 1, 0, a)
            else:
                an.freeze(a, f"MatMul '{node.name}' reads features on another axis")
        rid = an.new_root(w.shape[1], node, node.name or node.outputs[0].name)
        an.use("out", node, 1, 1, an.whole(rid, 0))
        an.set(node.outputs[0], an.whole(rid, ro - 1))
        return
    if g.constant(a_t) is not None or g.constant(b_t) is not None:
        an.freeze_inputs(node, f"MatMul '{node.name}' has a constant first operand")
        return
    _batched_matmul(an, node, a, b, ra, rb, ro)


def _batched_matmul(
    an: _Analyzer, node: Node, a: TensorChannels | None, b: TensorChannels | None, ra: int, rb: int, ro: int
) -> None:
    """Both operands are activations (attention's QK^T and scores x V): batch axes couple, the
    contraction pairs A's last axis with B's second-to-last, rows and columns pass through."""
    g = an.g
    outs: list[TensorChannels] = []
    a_k, b_k = ra - 1, rb - 2  # contraction axes
    if a is not None and a.axis == a_k or b is not None and b.axis == b_k:
        if a is not None and b is not None and a.axis == a_k and b.axis == b_k:
            an.couple(a, b, node.name)
        else:
            an.freeze(a, f"MatMul '{node.name}' contracts channels with an untracked operand")
            an.freeze(b, f"MatMul '{node.name}' contracts channels with an untracked operand")
        return
    # Blocks whose inner axis is contracted are heads: they prune whole.
    for x, k in ((a, a_k), (b, b_k)):
        if x is not None and x.inner == k:
            an.atomic(x)

    def out_inner(x: TensorChannels, rank: int, contracted: int) -> int | None:
        return None if x.inner is None or x.inner == contracted else _aligned(x.inner, rank, ro)

    batch_a = a is not None and a.axis < ra - 2
    batch_b = b is not None and b.axis < rb - 2
    if batch_a and batch_b:
        if _aligned(a.axis, ra, ro) != _aligned(b.axis, rb, ro):
            an.freeze(a, f"MatMul '{node.name}' aligns channel axes differently")
            an.freeze(b, f"MatMul '{node.name}' aligns channel axes differently")
            return
        an.couple(a, b, node.name)
        keep = b if out_inner(b, rb, b_k) is not None else a
        rank, k = (rb, b_k) if keep is b else (ra, a_k)
        an.set(node.outputs[0], keep.moved(_aligned(keep.axis, rank, ro), out_inner(keep, rank, k)))
        return
    for x, rank, k, other, orank in ((a, ra, a_k, node.inputs[1], rb), (b, rb, b_k, node.inputs[0], ra)):
        if x is None:
            continue
        if x.axis < rank - 2:  # a batch axis: the other operand must broadcast there
            d = _dim(g, other, _aligned(x.axis, rank, ro) - (ro - orank)) if x.axis + ro - rank >= ro - orank else 1
            if d != 1:
                an.freeze(x, f"MatMul '{node.name}' mixes these channels with unanalyzed values")
                continue
        outs.append(x.moved(_aligned(x.axis, rank, ro), out_inner(x, rank, k)))
    if len(outs) == 1:
        an.set(node.outputs[0], outs[0])
    elif len(outs) > 1:
        for x in outs:
            an.freeze(x, f"MatMul '{node.name}' would put two channel sets on one tensor")


@_rule(Rule.SAME)
def _same(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if node.op in ("Dropout", "MaxPool") and len(node.outputs) > 1:
        extra = node.outputs[1]
        if an.g.consumers(extra) or an.g.is_graph_output(extra):
            an.freeze(x, f"the second output of {node.op} '{node.name}' is used")
            return
    if node.op in ("MaxPool", "AveragePool", "LpPool") and x is not None and x.inner is not None:
        an.atomic(x)
    an.set(node.outputs[0], x)


@_rule(Rule.CLIP)
def _clip(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    for t in node.inputs[1:]:
        c = an.g.constant(t) if t.name else None
        if t.name and (c is None or c.size != 1):
            an.freeze(x, f"Clip '{node.name}' has non-scalar bounds")
            return
    an.set(node.outputs[0], x)


@_rule(Rule.MIXES)
def _mixes(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    an.freeze(x, f"{node.op} '{node.name}' mixes neighbouring channels")
    an.set(node.outputs[0], x)


@_rule(Rule.SHAPE)
def _shape(an: _Analyzer, node: Node) -> None:
    """Shape and Size read only the shape: after pruning they report the new one."""


@_rule(Rule.OPAQUE)
def _opaque(an: _Analyzer, node: Node) -> None:
    an.freeze_inputs(node, f"{node.op} '{node.name}' rearranges elements in a way pruning does not follow")


@_rule(Rule.NORM)
def _norm(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    nparams = 4 if node.op == "BatchNormalization" else 2
    if x is None:
        return
    if x.axis != 1 or x.block > 1 or any(g.constant(t) is None for t in node.inputs[1 : 1 + nparams]):
        an.freeze(x, f"{node.op} '{node.name}' has non-constant parameters or another channel axis")
        an.set(node.outputs[0], x)
        return
    if node.op == "BatchNormalization" and node.attrs.get("training_mode", 0):
        an.freeze(x, f"BatchNormalization '{node.name}' is in training mode")
    for i in range(1, 1 + nparams):
        an.use("param", node, i, 0, x)
    an.set(node.outputs[0], x)


@_rule(Rule.LAYER_NORM)
def _layer_norm(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    rank = g.rank(node.inputs[0])
    if x is None or rank is None:
        return
    axis = int(node.attrs.get("axis", -1)) % rank
    if x.axis < axis:  # normalizes other axes: the channels pass through untouched
        an.set(node.outputs[0], x)
        return
    if x.axis != rank - 1 or axis != rank - 1 or x.block > 1:
        an.freeze(x, f"{node.op} '{node.name}' normalizes over the channels and other axes")
        return
    for i in (1, 2):
        if _has(node, i):
            c = g.constant(node.inputs[i])
            if c is None:
                an.freeze(x, f"{node.op} '{node.name}' has non-constant parameters")
                return
            if c.size > 1:
                an.use("param", node, i, c.ndim - 1, x)
    an.approximate(
        x,
        f"{node.op} '{node.name}' normalizes over these channels: after pruning its mean and "
        "variance are taken over the kept channels only",
    )
    an.set(node.outputs[0], x)


@_rule(Rule.ELEMENTWISE)
def _elementwise(an: _Analyzer, node: Node) -> None:
    g = an.g
    out = node.outputs[0]
    out_rank = g.rank(out)
    if out_rank is None:
        an.freeze_inputs(node, f"{node.op} '{node.name}' has an output of unknown rank")
        return
    infos: list[tuple[TensorChannels, int]] = []  # (channel map, its rank)
    plain: list[Tensor] = []  # operands without a channel map
    consts: list[tuple[Node, int, np.ndarray]] = []
    for i, t in enumerate(node.inputs):
        if not t.name:
            continue
        info = an.get(t)
        if info is not None:
            infos.append((info, g.rank(t) or out_rank))
            continue
        c = g.constant(t)
        src = (node, i, c) if c is not None else _const_source(g, t)
        if src is not None:
            consts.append(src)
        else:
            plain.append(t)
    if not infos:
        return
    axes = {_aligned(x.axis, r, out_rank) for x, r in infos}
    if len(axes) != 1:
        for x, _ in infos:
            an.freeze(x, f"{node.op} '{node.name}' aligns channel axes differently")
        return
    axis = axes.pop()
    base, base_rank = infos[0]
    for t in plain:  # an untracked operand must broadcast along the channel axis
        rank = g.rank(t)
        d = _dim(g, t, axis - (out_rank - rank)) if rank is not None and axis >= out_rank - rank else 1
        if d != 1:
            for x, _ in infos:
                an.freeze(x, f"{node.op} '{node.name}' mixes these channels with unanalyzed values")
            return
    full = [x for x, _ in infos if x.positions > 1]
    for other in full[1:]:
        an.couple(full[0], other, node.name)
    tc = base.moved(axis, None if base.inner is None else _aligned(base.inner, base_rank, out_rank))
    for src_node, index, c in consts:
        a_c = axis - (out_rank - c.ndim)
        if c.size == 1 or a_c < 0 or c.shape[a_c] == 1:
            continue
        if c.shape[a_c] != tc.positions:
            an.freeze(tc, f"constant of {node.op} '{node.name}' does not match the channels")
            return
        an.use("param", src_node, index, a_c, tc)
        if src_node is not node:
            an.fixups.append(("expand", src_node))
    if node.op == "PRelu" and g.constant(node.inputs[1]) is None and not consts:
        an.freeze(tc, f"PRelu '{node.name}' has a non-constant slope")
    an.set(out, tc)


@_rule(Rule.CONCAT)
def _concat(an: _Analyzer, node: Node) -> None:
    g = an.g
    rank = g.rank(node.outputs[0])
    if rank is None:
        an.freeze_inputs(node)
        return
    axis = int(node.attrs.get("axis", 0)) % rank
    infos = [an.get(t) for t in node.inputs]
    if all(i is None for i in infos):
        return
    along = [i for i in infos if i is not None and i.axis == axis]
    if along:  # concatenation of channels: pieces side by side
        pieces: list[Piece] = []
        for t, info in zip(node.inputs, infos, strict=True):
            if info is None or info.axis != axis:
                d = _dim(g, t, axis)
                if not isinstance(d, int) or d < 1:
                    for x in infos:
                        an.freeze(x, f"an input of Concat '{node.name}' has an unknown size")
                    return
                rid = an.new_root(d, None, t.name, f"an input of Concat '{node.name}' is not analyzable")
                an.freeze(info, f"Concat '{node.name}' mixes channel axes")
                info = an.whole(rid, axis)
            pieces.extend(info.pieces)
        inners = {i.inner for i in infos if i is not None}
        an.set(node.outputs[0], TensorChannels(axis, tuple(pieces), inners.pop() if len(inners) == 1 else None))
        return
    # Concatenation along another axis (tokens, batch, space): the channels are shared.
    known = [i for i in infos if i is not None]
    if len({i.axis for i in known}) != 1:
        for i in known:
            an.freeze(i, f"Concat '{node.name}' mixes channel axes")
        return
    base = known[0]
    if axis == base.inner:
        an.atomic(base)
    for t, info in zip(node.inputs, infos, strict=True):
        if info is not None:
            an.couple(base, info, node.name)
            continue
        src = _const_source(g, t)
        if src is None or src[2].ndim != rank or src[2].shape[base.axis] != base.positions:
            an.freeze(base, f"an input of Concat '{node.name}' shares the channels but is not analyzable")
            return
        an.use("param", src[0], src[1], base.axis, base)
        if src[0] is not node:
            an.fixups.append(("expand", src[0]))
    an.set(node.outputs[0], base)


@_rule(Rule.SPLIT)
def _split(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = g.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis != x.axis:
        if axis == x.inner:
            an.atomic(x)
        for o in node.outputs:
            an.set(o, x)
        return
    sizes = [_dim(g, o, axis) for o in node.outputs]
    explicit = _has(node, 1) or "split" in node.attrs
    if explicit and _has(node, 1) and g.constant(node.inputs[1]) is None or not all(isinstance(s, int) for s in sizes):
        an.freeze(x, f"Split '{node.name}' has computed sizes")
        return
    parts = _cut(x, sizes)  # type: ignore[arg-type]
    if parts is None:
        an.freeze(x, f"Split '{node.name}' cuts through a block of channels")
        return
    if not explicit:  # equal parts without sizes: pruning must keep them equal, so tie them
        for part in parts[1:]:
            an.couple(parts[0], part, node.name)
    else:
        an.fixups.append(("split", node))
    for o, part in zip(node.outputs, parts, strict=True):
        an.set(o, part)


def _cut(x: TensorChannels, sizes: list[int]) -> list[TensorChannels] | None:
    """``x``'s positions cut into consecutive parts of ``sizes`` positions, or None if a cut falls
    inside a repeated block."""
    flat: list[tuple[Piece, int]] = []  # (piece, block index) per block, in order
    for p in x.pieces:
        flat.extend((p, k) for k in range(p.blocks))
    parts, i = [], 0
    for size in sizes:
        got: list[Piece] = []
        need = size
        while need > 0 and i < len(flat):
            p, k = flat[i]
            if p.rep > need:
                return None
            # Gather consecutive blocks of the same piece.
            j = i
            while j < len(flat) and flat[j][0] is p and (j - i + 1) * p.rep <= need:
                j += 1
            first, last = flat[i][1], flat[j - 1][1] + 1
            got.append(Piece(p.root, p.chans[first * p.block : last * p.block], p.block, p.rep))
            need -= (last - first) * p.rep
            i = j
        if need != 0:
            return None
        parts.append(TensorChannels(x.axis, tuple(got), x.inner))
    return parts if i == len(flat) else None


@_rule(Rule.TRANSPOSE)
def _transpose(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = an.g.rank(node.inputs[0])
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    an.set(node.outputs[0], x.moved(perm.index(x.axis), None if x.inner is None else perm.index(x.inner)))


def _axes_of(an: _Analyzer, node: Node, rank: int) -> list[int] | None:
    axes = node.attrs.get("axes")
    if axes is None and _has(node, 1):
        c = an.g.constant(node.inputs[1])
        axes = None if c is None else c.reshape(-1).tolist()
    return None if axes is None else [int(a) % rank for a in axes]


@_rule(Rule.SQUEEZE)
def _squeeze(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rin, rout = g.rank(node.inputs[0]), g.rank(node.outputs[0])
    if rin is None or rout is None:
        an.freeze(x, f"{node.op} '{node.name}' has an unknown rank")
        return
    if node.op == "Unsqueeze":
        axes = _axes_of(an, node, rout)
        if axes is None:
            an.freeze(x, f"Unsqueeze '{node.name}' has computed axes")
            return
        kept = [a for a in range(rout) if a not in axes]  # output axes that come from the input
    else:
        axes = _axes_of(an, node, rin)
        if axes is None:  # all dims of size 1
            shp = g.shape(node.inputs[0]) or ()
            axes = [i for i, d in enumerate(shp) if d == 1]
        if x.axis in axes or x.inner in axes:
            an.freeze(x, f"Squeeze '{node.name}' removes the channel axis")
            return
        remap = {a: i for i, a in enumerate(a for a in range(rin) if a not in axes)}
        an.set(node.outputs[0], x.moved(remap[x.axis], None if x.inner is None else remap[x.inner]))
        return
    an.set(node.outputs[0], x.moved(kept[x.axis], None if x.inner is None else kept[x.inner]))


@_rule(Rule.SLICE)
def _slice(an: _Analyzer, node: Node) -> None:
    """Slicing other axes (a crop, the inner half of a head for RoPE) keeps the channels; slicing
    the channel axis freezes them."""
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = g.rank(node.inputs[0])
    starts = g.constant(node.inputs[1]) if _has(node, 1) else None
    axes_t = node.inputs[3] if _has(node, 3) else None
    if axes_t is not None:
        axes = g.constant(axes_t)
    elif starts is not None:
        axes = np.arange(len(starts.reshape(-1)))
    else:
        axes = None
    sliced = None if rank is None or axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if sliced is None or x.axis in sliced:
        an.freeze(x, f"Slice '{node.name}' cuts the channel axis (or its axes are not constant)")
        return
    if x.inner in sliced:
        an.atomic(x)
    an.set(node.outputs[0], x)


@_rule(Rule.PAD)
def _pad(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    pads = an.g.constant(node.inputs[1]) if _has(node, 1) else np.asarray(node.attrs.get("pads", []))
    rank = an.g.rank(node.inputs[0])
    if pads is None or _has(node, 3) or rank is None:
        an.freeze(x, f"Pad '{node.name}' has computed pads or explicit axes")
        return
    pads = pads.reshape(-1)
    if len(pads) != 2 * rank or pads[x.axis] != 0 or pads[x.axis + rank] != 0:
        an.freeze(x, f"Pad '{node.name}' pads the channel axis")
        return
    if x.inner is not None and (pads[x.inner] or pads[x.inner + rank]):
        an.atomic(x)
    an.set(node.outputs[0], x)


@_rule(Rule.RESIZE)
def _resize(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    g = an.g
    sizes = g.constant(node.inputs[3]) if _has(node, 3) else None
    if sizes is not None or _dim(g, node.inputs[0], x.axis) != _dim(g, node.outputs[0], x.axis) or x.inner is not None:
        an.freeze(x, f"{node.op} '{node.name}' fixes the channel count or scales channels")
        return
    an.set(node.outputs[0], x)


@_rule(Rule.REDUCE, Rule.SOFTMAX)
def _reduce_like(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = g.rank(node.inputs[0])
    if node.op in ("Softmax", "LogSoftmax", "Hardmax"):
        axis = int(node.attrs.get("axis", -1)) % rank
        if axis == x.axis:
            an.freeze(x, f"{node.op} '{node.name}' normalizes over the channels")
            return
        if axis == x.inner:
            an.atomic(x)
        an.set(node.outputs[0], x)
        return
    axes = _axes_of(an, node, rank)
    if axes is None and not _has(node, 1) and "axes" not in node.attrs:
        axes = list(range(rank)) if not node.attrs.get("noop_with_empty_axes", 0) else []
    keep = bool(node.attrs.get("keepdims", 1))
    if axes is None:
        an.freeze(x, f"{node.op} '{node.name}' reduces over computed axes")
        return
    if x.axis in axes:
        if node.op == "ReduceMean" and keep and axes == [x.axis] and x.block == 1:
            # RMSNorm / LayerNorm written out: a per-position statistic broadcast back later.
            an.approximate(
                x,
                f"{node.op} '{node.name}' averages over these channels: after pruning it averages "
                "over the kept channels only",
            )
            return
        an.freeze(x, f"{node.op} '{node.name}' reduces over the channels")
        return
    if x.inner in axes:
        an.atomic(x)
    if keep:
        an.set(node.outputs[0], x.moved(x.axis, None if x.inner in axes else x.inner))
        return
    shift = sum(1 for a in axes if a < x.axis)
    inner = None if x.inner is None or x.inner in axes else x.inner - sum(1 for a in axes if a < x.inner)
    an.set(node.outputs[0], x.moved(x.axis - shift, inner))


@_rule(Rule.GATHER)
def _gather(an: _Analyzer, node: Node) -> None:
    g = an.g
    table = weight_node(g, node)
    out_rank = g.rank(node.outputs[0])
    if table is not None and out_rank is not None:  # an embedding lookup: a new set of channels
        rid = an.new_root(table.shape[1], node, node.name or node.outputs[0].name)
        an.use("out", node, 0, 1, an.whole(rid, 0))
        an.set(node.outputs[0], an.whole(rid, out_rank - 1))
        return
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank, idx_rank = g.rank(node.inputs[0]), g.rank(node.inputs[1])
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis == x.axis or idx_rank is None:
        an.freeze(x, f"Gather '{node.name}' picks channels")
        return
    if axis == x.inner:
        an.atomic(x)

    def moved(a: int | None) -> int | None:
        if a is None or a == axis:
            return None
        return a if a < axis else a + idx_rank - 1

    an.set(node.outputs[0], x.moved(moved(x.axis), moved(x.inner)))  # type: ignore[arg-type]


@_rule(Rule.EXPAND)
def _expand(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rin, rout = g.rank(node.inputs[0]), g.rank(node.outputs[0])
    if rin is None or rout is None:
        an.freeze(x, f"Expand '{node.name}' has an unknown rank")
        return
    axis = _aligned(x.axis, rin, rout)
    if _dim(g, node.outputs[0], axis) != _dim(g, node.inputs[0], x.axis):
        an.freeze(x, f"Expand '{node.name}' broadcasts the channel axis")
        return
    an.fixups.append(("expand_shape", node))  # an explicit channel count in the target shape follows
    an.set(node.outputs[0], x.moved(axis, None if x.inner is None else _aligned(x.inner, rin, rout)))


# ---- Reshape and Flatten


def _factors(d: int | str) -> tuple[int, tuple[str, ...]] | None:
    """A dim as (integer coefficient, sorted symbol names): ``B*S`` -> (1, ('B', 'S'))."""
    if isinstance(d, int):
        return (d, ()) if d >= 0 else None
    if d == "?" or d.startswith("unk__"):
        return None
    coef, names = 1, []
    for f in d.replace(" ", "").split("*"):
        if f.isdigit():
            coef *= int(f)
        elif f:
            names.append(f)
    return coef, tuple(sorted(names))


def _mul(a: tuple[int, tuple[str, ...]], b: tuple[int, tuple[str, ...]]) -> tuple[int, tuple[str, ...]]:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _axis_groups(ins: tuple, outs: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Consecutive axes of a reshape's input and output with equal products, in order."""
    fi = [_factors(d) for d in ins]
    fo = [_factors(d) for d in outs]
    if any(f is None for f in fi + fo):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(fi) or j < len(fo):
        gi, gj = [], []
        pi: tuple[int, tuple[str, ...]] = (1, ())
        pj: tuple[int, tuple[str, ...]] = (1, ())
        if i < len(fi):
            pi = fi[i]  # type: ignore[assignment]
            gi.append(i)
            i += 1
        if j < len(fo):
            pj = fo[j]  # type: ignore[assignment]
            gj.append(j)
            j += 1
        while pi != pj:
            if (pi[0] < pj[0] or len(pi[1]) < len(pj[1])) and i < len(fi):
                pi = _mul(pi, fi[i])  # type: ignore[arg-type]
                gi.append(i)
                i += 1
            elif j < len(fo):
                pj = _mul(pj, fo[j])  # type: ignore[arg-type]
                gj.append(j)
                j += 1
            elif i < len(fi):
                pi = _mul(pi, fi[i])  # type: ignore[arg-type]
                gi.append(i)
                i += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshaped(x: TensorChannels, ins: tuple, outs: tuple) -> tuple[TensorChannels | None, bool]:
    """The channel map after a reshape (None: the channels do not survive it in a form the
    analysis follows), and whether the reshape shuffles channels across blocks."""
    groups = _axis_groups(ins, outs)
    if groups is None:
        return None, False
    gi, gj = next((a, b) for a, b in groups if x.axis in a)
    # Drop size-1 axes: they carry nothing.
    gi_n = [k for k in gi if ins[k] != 1 or k == x.axis]
    gj_n = [k for k in gj if outs[k] != 1]
    if not gj_n:
        return None, False
    c = gi_n.index(x.axis)
    if c > 0:
        return None, False  # the channel axis is not the group's major axis
    trailing = [ins[k] for k in gi_n[1:]]
    t_prod = math.prod(trailing) if all(isinstance(d, int) for d in trailing) else None
    if len(gj_n) == 1:  # merge: [channels, t...] -> [channels * t]
        if t_prod is None:
            return None, False
        if x.inner is not None and gi_n[1:] == [x.inner] and x.block == t_prod:
            # The inner axis folds back into its blocks: [heads, head_dim] -> [heads * head_dim].
            return TensorChannels(gj_n[0], tuple(Piece(p.root, p.chans, 1, p.rep) for p in x.pieces)), False
        if x.inner is not None and x.inner in gi_n[1:]:
            return None, False
        inner = _map_axis(groups, ins, outs, x.inner)
        if x.inner is not None and inner is None:
            return None, False
        return TensorChannels(
            gj_n[0], tuple(Piece(p.root, p.chans, p.block, p.rep * t_prod) for p in x.pieces), inner
        ), False
    if len(gi_n) == 1 and x.inner is None:  # split: [channels] -> [o1, o2, ...]
        rest = [outs[k] for k in gj_n[1:]]
        r_prod = math.prod(rest) if all(isinstance(d, int) for d in rest) else None
        if r_prod is None:
            return None, False
        if all(p.rep % r_prod == 0 for p in x.pieces):  # un-flatten
            return TensorChannels(
                gj_n[0], tuple(Piece(p.root, p.chans, p.block, p.rep // r_prod) for p in x.pieces)
            ), False
        if len(gj_n) == 2 and all(p.rep == 1 and p.block == 1 and len(p.chans) % r_prod == 0 for p in x.pieces):
            # [B, S, heads * head_dim] -> [B, S, heads, head_dim]: positions become blocks.
            return TensorChannels(gj_n[0], tuple(Piece(p.root, p.chans, r_prod) for p in x.pieces), gj_n[1]), False
    return None, False


def _map_axis(groups: list[tuple[list[int], list[int]]], ins: tuple, outs: tuple, axis: int | None) -> int | None:
    """Where input ``axis`` lands after a reshape, if its dim passes through unchanged."""
    if axis is None:
        return None
    for gi, gj in groups:
        if axis in gi:
            gi_n = [k for k in gi if ins[k] != 1 or k == axis]
            gj_n = [k for k in gj if outs[k] != 1]
            return gj_n[0] if len(gi_n) == 1 and len(gj_n) == 1 else None
    return None


def _merge_pieces(pieces: list[Piece]) -> tuple[Piece, ...]:
    """Join consecutive single-channel pieces of the same root."""
    out: list[Piece] = []
    run: list[int] = []
    root = -1
    for p in pieces:
        if p.root != root and run:
            out.append(Piece(root, np.array(run, dtype=np.int64)))
            run = []
        root = p.root
        run.extend(p.chans.tolist())
    if run:
        out.append(Piece(root, np.array(run, dtype=np.int64)))
    return tuple(out)


@_rule(Rule.RESHAPE)
def _reshape(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    if _channel_shuffle(an, node, x):
        return
    ins, outs = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    out, _ = _reshaped(x, ins, outs) if ins and outs else (None, False)
    if out is None:
        an.freeze(x, f"{node.op} '{node.name}' reorders the channels in a way pruning does not follow")
        return
    if node.op == "Reshape":
        # A constant target shape (or a constant entry of a Concat that computes it) is rewritten
        # after pruning; -1 and entries computed from run-time shapes follow the pruned tensors.
        an.fixups.append(("reshape", node))
    if x.block == 1 and out.block > 1 and all(p.rep == 1 for p in out.pieces):
        # Each block keeps as many channels (the target shape names the block size), unless the
        # blocks turn out to be atomic (attention heads), which the group check sees.
        an.partition(x, out.positions, node.name, soft=True)
    an.set(node.outputs[0], out)


def _channel_shuffle(an: _Analyzer, node: Node, x: TensorChannels) -> bool:
    """A channel shuffle (ShuffleNet): Reshape [.., C, ..] -> [.., g, C/g, ..], Transpose of those
    two axes, Reshape back. The result is a permutation of the channels; deleting channels keeps
    it a shuffle only if every group drops the same indices, so channel i of each group prunes
    together. True if ``node`` starts one (the whole pattern is then handled here)."""
    g = an.g
    ins, outs = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    a = x.axis
    if not ins or not outs or len(outs) != len(ins) + 1 or x.block != 1 or any(p.rep != 1 for p in x.pieces):
        return False
    groups, per = outs[a], outs[a + 1] if a + 1 < len(outs) else None
    if not isinstance(groups, int) or not isinstance(per, int) or groups * per != ins[a] or groups < 2:
        return False
    t = g.consumers(node.outputs[0])
    if len(t) != 1 or t[0].op != "Transpose" or g.is_graph_output(node.outputs[0]):
        return False
    perm = list(t[0].attrs.get("perm", []))
    swapped = list(range(len(outs)))
    swapped[a], swapped[a + 1] = a + 1, a
    back = g.consumers(t[0].outputs[0])
    if perm != swapped or len(back) != 1 or back[0].op != "Reshape" or g.is_graph_output(t[0].outputs[0]):
        return False
    if tuple(g.shape(back[0].outputs[0]) or ()) != tuple(ins):
        return False
    roots, chans = x.position_channels()
    order = np.arange(ins[a]).reshape(groups, per).T.reshape(-1)  # output position -> input position
    pieces = [Piece(int(roots[i]), chans[i : i + 1]) for i in order]
    bases = np.array([r.base for r in an.roots], dtype=np.int64)
    ids = (bases[roots] + chans).reshape(groups, per)
    for k in range(1, groups):
        an.uf.union_pairs(ids[0], ids[k])
    an.fixups.append(("shuffle", node))
    an.fixups.append(("reshape", back[0]))
    an.set(back[0].outputs[0], TensorChannels(a, _merge_pieces(pieces)))
    return True


def channel_groups(graph: Graph, ctx: Any = None) -> ChannelAnalysis:
    """The analysis (usable as ``ctx.analysis(channel_groups, graph)``). Needs inferred shapes."""
    return _Analyzer(graph).run()
