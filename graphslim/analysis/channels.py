"""Channel dependency analysis: which channels of which tensors must be pruned together.

Every Conv, ConvTranspose, Gemm and MatMul with constant weights starts a *root*: its output
channels. Channels then flow forward through the graph; each tensor gets a channel map, a list of
segments ``(root, length, rep)`` along its channel axis (``rep`` features per channel, e.g. H*W
after a Flatten). Elementwise ops between activations (residual Add, gating Mul) couple the roots
of their operands; Concat lays segments side by side; Flatten/Reshape widen ``rep``.

Coupled roots form a *group* (union-find): pruning channel ``i`` of a group removes channel ``i``
of every root in it, and every *use* of those channels: producer weight rows and biases, consumer
weight columns, per-channel constants (BatchNorm, PRelu, Mul/Add), depthwise weights, Split sizes
and Reshape shapes.

Whatever the analysis does not understand freezes the roots that reach it, with a reason: an op
without a handler, a channel shuffle, a Split that cuts a root, a graph output. A frozen group is
never pruned, so the analysis can be incomplete but never wrong.

Per-op handlers live in ``_HANDLERS``, keyed by op type (Torch-Pruning's per-op registry idea).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphslim.core.ir import Graph, Node, Tensor

__all__ = ["ChannelAnalysis", "Group", "Root", "Seg", "TensorChannels", "Use", "channel_groups"]


@dataclass
class Root:
    """The output channels of one weight-bearing node (or a frozen stand-in)."""

    id: int
    size: int
    producer: Node | None
    origin: str  # a tensor or node name, for messages
    frozen: list[str] = field(default_factory=list)
    slices: int = 1  # pruning must remove equal counts from each of `slices` equal parts


@dataclass(frozen=True)
class Seg:
    root: int
    length: int  # channels of the root covered by this segment (always the whole root when prunable)
    rep: int = 1  # features per channel along the axis
    start: int = 0  # first channel of the root covered


@dataclass(frozen=True)
class TensorChannels:
    axis: int  # non-negative channel axis
    segs: tuple[Seg, ...]

    @property
    def features(self) -> int:
        return sum(s.length * s.rep for s in self.segs)

    def offsets(self) -> list[int]:
        out, off = [], 0
        for s in self.segs:
            out.append(off)
            off += s.length * s.rep
        return out


@dataclass
class Use:
    """A constant input of a node indexed by a root's channels along ``axis``.

    kind: ``out`` (producer weights/bias), ``in`` (consumer weights), ``param`` (per-channel
    constants such as BatchNorm statistics), ``group_in`` (grouped-conv weight columns).
    """

    kind: str
    node: Node
    index: int
    axis: int
    offset: int
    rep: int


@dataclass
class Group:
    id: int
    size: int
    roots: list[int]
    frozen: list[str]
    slices: int

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1


@dataclass
class ChannelAnalysis:
    roots: list[Root]
    tensors: dict[int, TensorChannels]  # id(tensor) -> channels
    names: dict[int, str]  # id(tensor) -> name
    uses: dict[int, list[Use]]  # root id -> uses
    fixups: list[tuple[str, Node]]  # ("depthwise" | "split" | "reshape", node)
    groups: list[Group]
    group_of: dict[int, int]  # root id -> group id

    def group_uses(self, g: Group) -> list[tuple[int, Use]]:
        return [(r, u) for r in g.roots for u in self.uses.get(r, [])]

    def describe(self) -> list[dict[str, Any]]:
        """Groups as plain data (for ``inspect --groups`` and the report)."""
        out = []
        for g in self.groups:
            members = []
            for r in g.roots:
                root = self.roots[r]
                members.append(
                    {"root": root.origin, "uses": sorted({f"{u.node.name}:{u.kind}" for u in self.uses.get(r, [])})}
                )
            out.append(
                {
                    "group": g.id,
                    "channels": g.size,
                    "prunable": g.prunable,
                    "prunable_channels": g.size - g.slices if g.prunable else 0,
                    "why_not": sorted(set(g.frozen)) if g.frozen else ([] if g.size > 1 else ["single channel"]),
                    "slices": g.slices,
                    "members": members,
                }
            )
        return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Analyzer:
    def __init__(self, graph: Graph):
        self.g = graph
        self.roots: list[Root] = []
        self.uf = _UnionFind()
        self.tc: dict[int, TensorChannels] = {}
        self.names: dict[int, str] = {}
        self.uses: dict[int, list[Use]] = {}
        self.fixups: list[tuple[str, Node]] = []

    # ---- roots and channel maps
    def new_root(self, size: int, producer: Node | None, origin: str, frozen: str | None = None) -> int:
        rid = self.uf.add()
        self.roots.append(Root(rid, size, producer, origin, [frozen] if frozen else []))
        return rid

    def set(self, t: Tensor, tc: TensorChannels | None) -> None:
        if tc is not None:
            self.tc[id(t)] = tc
            self.names[id(t)] = t.name

    def get(self, t: Tensor) -> TensorChannels | None:
        return self.tc.get(id(t))

    def freeze(self, tc: TensorChannels | None, reason: str) -> None:
        if tc is None:
            return
        for s in tc.segs:
            self.roots[s.root].frozen.append(reason)

    def freeze_inputs(self, node: Node, reason: str | None = None) -> None:
        why = reason or f"read by {node.op} node '{node.name}', which pruning does not handle"
        for t in node.inputs:
            self.freeze(self.get(t), why)

    def use(self, root: int, kind: str, node: Node, index: int, axis: int, offset: int, rep: int) -> None:
        self.uses.setdefault(root, []).append(Use(kind, node, index, axis, offset, rep))

    def fresh(self, t: Tensor, node: Node, axis: int, reason: str | None = None) -> TensorChannels | None:
        """A new (frozen if ``reason``) root for tensor ``t`` of a known channel count."""
        shp = self.g.shape(t)
        if shp is None or axis >= len(shp) or not isinstance(shp[axis], int):
            return None
        rid = self.new_root(shp[axis], node if reason is None else None, t.name, reason)
        return TensorChannels(axis, (Seg(rid, shp[axis]),))

    def couple(self, a: TensorChannels, b: TensorChannels, where: str) -> bool:
        """Make two channel maps share channels (elementwise op). False if they could not."""
        if (
            a.axis != b.axis
            or len(a.segs) != len(b.segs)
            or any((x.length, x.rep) != (y.length, y.rep) for x, y in zip(a.segs, b.segs, strict=True))
        ):
            reason = f"channels of the operands of '{where}' do not line up"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return False
        for x, y in zip(a.segs, b.segs, strict=True):
            rx, ry = self.roots[x.root], self.roots[y.root]
            whole = x.start == 0 and y.start == 0 and x.length == rx.size and y.length == ry.size
            if not whole:
                if (x.root, x.start) != (y.root, y.start):
                    reason = f"'{where}' couples parts of channel sets"
                    rx.frozen.append(reason)
                    ry.frozen.append(reason)
                continue
            self.uf.union(x.root, y.root)
        return True

    # ---- the walk
    def run(self) -> ChannelAnalysis:
        g = self.g
        for t in g.inputs:
            rank = g.rank(t)
            if rank and rank >= 2:
                self.set(t, self.fresh(t, None, 1, "graph input"))
        g.toposort()
        for node in g.nodes:
            handler = _HANDLERS.get(node.op)
            if node.domain not in (None, "", "ai.onnx") or handler is None:
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
        members: dict[int, list[int]] = {}
        for r in range(len(self.roots)):
            members.setdefault(self.uf.find(r), []).append(r)
        groups: list[Group] = []
        group_of: dict[int, int] = {}
        for rep_root in sorted(members):
            rids = members[rep_root]
            size = self.roots[rids[0]].size
            frozen = [f for r in rids for f in self.roots[r].frozen]
            slices = 1
            for r in rids:
                slices = slices * self.roots[r].slices // math.gcd(slices, self.roots[r].slices)
            if any(self.roots[r].size != size for r in rids):
                frozen.append("coupled channel sets differ in size")
            if size % slices:
                frozen.append(f"grouped convolutions need {slices} equal parts of {size} channels")
            if not any(u.kind == "out" for r in rids for u in self.uses.get(r, [])):
                frozen.append("no weight produces these channels")
            gid = len(groups)
            groups.append(Group(gid, size, rids, frozen, slices))
            for r in rids:
                group_of[r] = gid
        return ChannelAnalysis(self.roots, self.tc, self.names, self.uses, self.fixups, groups, group_of)


# --------------------------------------------------------------------------- op handlers

Handler = Callable[[_Analyzer, Node], None]
_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return deco


def _const_uses(
    an: _Analyzer, node: Node, tc: TensorChannels, kind: str, index: int, axis: int, rep: int = 1, base_offset: int = 0
) -> None:
    """Record that constant input ``index`` is indexed by ``tc``'s channels along ``axis``."""
    off = base_offset
    for s in tc.segs:
        an.use(s.root, kind, node, index, axis, off, s.rep * rep)
        off += s.length * s.rep * rep


def _has_bias(node: Node, index: int = 2) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


@_handles("Conv")
def _conv(an: _Analyzer, node: Node) -> None:
    g = an.g
    w = g.constant(node.inputs[1])
    x = an.get(node.inputs[0])
    if w is None or w.ndim < 3 or (_has_bias(node) and g.constant(node.inputs[2]) is None):
        an.freeze(x, f"Conv '{node.name}' has non-constant weights")
        an.set(node.outputs[0], an.fresh(node.outputs[0], node, 1, f"Conv '{node.name}' has non-constant weights"))
        return
    groups = int(node.attrs.get("group", 1))
    cout, cin = w.shape[0], w.shape[1] * groups
    if x is not None and x.axis != 1:
        an.freeze(x, f"Conv '{node.name}' reads channels on another axis")
        x = None
    if groups == 1:
        if x is not None:
            _const_uses(an, node, x, "in", 1, 1)
        rid = an.new_root(cout, node, node.name)
        an.use(rid, "out", node, 1, 0, 0, 1)
        if _has_bias(node):
            an.use(rid, "out", node, 2, 0, 0, 1)
        an.set(node.outputs[0], TensorChannels(1, (Seg(rid, cout),)))
        return
    if groups == cin == cout:  # depthwise: channel i in, channel i out
        if x is None:
            an.set(
                node.outputs[0],
                an.fresh(node.outputs[0], node, 1, f"input of depthwise Conv '{node.name}' is not analyzable"),
            )
            return
        _const_uses(an, node, x, "param", 1, 0)
        if _has_bias(node):
            _const_uses(an, node, x, "param", 2, 0)
        an.fixups.append(("depthwise", node))
        an.set(node.outputs[0], x)
        return
    if cout % groups or cin % groups:
        an.freeze(x, f"Conv '{node.name}' has an uneven group split")
        an.set(node.outputs[0], an.fresh(node.outputs[0], node, 1, f"Conv '{node.name}' has an uneven group split"))
        return
    # General grouped conv: equal counts per group on both sides.
    if x is not None:
        if len(x.segs) == 1 and x.segs[0].rep == 1 and an.roots[x.segs[0].root].size == cin and cin > groups:
            root = an.roots[x.segs[0].root]
            root.slices = root.slices * groups // math.gcd(root.slices, groups)
            an.use(root.id, "group_in", node, 1, 1, 0, 1)
        else:
            an.freeze(x, f"grouped Conv '{node.name}' reads a concatenation")
    if cout > groups:
        rid = an.new_root(cout, node, node.name)
        an.roots[rid].slices = groups
    else:
        rid = an.new_root(cout, None, node.name, f"grouped Conv '{node.name}' has one channel per group")
    an.use(rid, "out", node, 1, 0, 0, 1)
    if _has_bias(node):
        an.use(rid, "out", node, 2, 0, 0, 1)
    an.set(node.outputs[0], TensorChannels(1, (Seg(rid, cout),)))


@_handles("ConvTranspose")
def _conv_transpose(an: _Analyzer, node: Node) -> None:
    g = an.g
    w = g.constant(node.inputs[1])
    x = an.get(node.inputs[0])
    groups = int(node.attrs.get("group", 1))
    bias_ok = not _has_bias(node) or g.constant(node.inputs[2]) is not None
    if w is None or w.ndim < 3 or groups != 1 or not bias_ok or "output_shape" in node.attrs:
        why = f"ConvTranspose '{node.name}' is grouped, has non-constant weights or a fixed output_shape"
        an.freeze(x, why)
        an.set(node.outputs[0], an.fresh(node.outputs[0], node, 1, why))
        return
    if x is not None:
        if x.axis == 1:
            _const_uses(an, node, x, "in", 1, 0)
        else:
            an.freeze(x, f"ConvTranspose '{node.name}' reads channels on another axis")
    rid = an.new_root(w.shape[1], node, node.name)
    an.use(rid, "out", node, 1, 1, 0, 1)
    if _has_bias(node):
        an.use(rid, "out", node, 2, 0, 0, 1)
    an.set(node.outputs[0], TensorChannels(1, (Seg(rid, w.shape[1]),)))


@_handles("Gemm")
def _gemm(an: _Analyzer, node: Node) -> None:
    g = an.g
    w = g.constant(node.inputs[1])
    x = an.get(node.inputs[0])
    c = g.constant(node.inputs[2]) if _has_bias(node) else None
    trans_b = int(node.attrs.get("transB", 0))
    if w is None or w.ndim != 2 or node.attrs.get("transA", 0) or (_has_bias(node) and c is None):
        why = f"Gemm '{node.name}' has transA or non-constant weights"
        an.freeze(x, why)
        an.set(node.outputs[0], an.fresh(node.outputs[0], node, 1, why))
        return
    if x is not None:
        if x.axis == 1:
            _const_uses(an, node, x, "in", 1, 1 if trans_b else 0)
        else:
            an.freeze(x, f"Gemm '{node.name}' reads features on another axis")
    n = w.shape[0] if trans_b else w.shape[1]
    why = None
    if c is not None and c.size > 1 and not (c.ndim >= 1 and c.shape[-1] == n and c.size == n):
        why = f"Gemm '{node.name}' has a bias that is not per output feature"
    rid = an.new_root(n, node if why is None else None, node.name, why)
    an.use(rid, "out", node, 1, 0 if trans_b else 1, 0, 1)
    if c is not None and c.size == n and n > 1:
        an.use(rid, "out", node, 2, c.ndim - 1, 0, 1)
    an.set(node.outputs[0], TensorChannels(1, (Seg(rid, n),)))


@_handles("MatMul")
def _matmul(an: _Analyzer, node: Node) -> None:
    g = an.g
    w = g.constant(node.inputs[1])
    x = an.get(node.inputs[0])
    rank = g.rank(node.inputs[0])
    if w is None or w.ndim != 2 or rank is None or rank < 2 or g.constant(node.inputs[0]) is not None:
        an.freeze_inputs(node, f"MatMul '{node.name}' has no constant 2-D weight")
        an.set(node.outputs[0], None)
        return
    if x is not None:
        if x.axis == rank - 1:
            _const_uses(an, node, x, "in", 1, 0)
        else:
            an.freeze(x, f"MatMul '{node.name}' reads features on another axis")
    rid = an.new_root(w.shape[1], node, node.name)
    an.use(rid, "out", node, 1, 1, 0, 1)
    an.set(node.outputs[0], TensorChannels(rank - 1, (Seg(rid, w.shape[1]),)))


_UNARY = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Gelu",
    "Mish",
    "Exp",
    "Log",
    "Abs",
    "Neg",
    "Sqrt",
    "Erf",
    "Identity",
    "Floor",
    "Ceil",
    "Round",
    "Sin",
    "Cos",
    "Reciprocal",
    "ThresholdedRelu",
    "Sign",
    "Cast",
    "Dropout",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "Shrink",
)


@_handles(*_UNARY)
def _unary(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if (
        node.op in ("Dropout", "MaxPool")
        and len(node.outputs) > 1
        and (an.g.consumers(node.outputs[1]) or an.g.is_graph_output(node.outputs[1]))
    ):
        an.freeze(x, f"the second output of {node.op} '{node.name}' is used")
        return
    an.set(node.outputs[0], x)


@_handles("Clip")
def _clip(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    for t in node.inputs[1:]:
        if t.name and (an.g.constant(t) is None or an.g.constant(t).size != 1):
            an.freeze(x, f"Clip '{node.name}' has non-scalar bounds")
            return
    an.set(node.outputs[0], x)


@_handles("LRN")
def _lrn(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    an.freeze(x, f"LRN '{node.name}' mixes neighbouring channels")
    an.set(node.outputs[0], x)


@_handles("BatchNormalization", "InstanceNormalization")
def _norm(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    nparams = 4 if node.op == "BatchNormalization" else 2
    if x is None:
        return
    if x.axis != 1 or any(an.g.constant(t) is None for t in node.inputs[1 : 1 + nparams]):
        an.freeze(x, f"{node.op} '{node.name}' has non-constant parameters")
        an.set(node.outputs[0], x)
        return
    if node.op == "BatchNormalization" and node.attrs.get("training_mode", 0):
        an.freeze(x, f"BatchNormalization '{node.name}' is in training mode")
    for i in range(1, 1 + nparams):
        _const_uses(an, node, x, "param", i, 0)
    an.set(node.outputs[0], x)


@_handles("PRelu")
def _prelu(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    _elementwise(an, node)
    if x is not None and an.g.constant(node.inputs[1]) is None:
        an.freeze(x, f"PRelu '{node.name}' has a non-constant slope")


@_handles("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow")
def _elementwise(an: _Analyzer, node: Node) -> None:
    g = an.g
    out_rank = g.rank(node.outputs[0])
    acts = [t for t in node.inputs if g.constant(t) is None]
    infos = [an.get(t) for t in acts]
    if out_rank is None or not acts or any(i is None for i in infos):
        for i in infos:
            an.freeze(i, f"{node.op} '{node.name}' mixes these channels with unanalyzed values")
        an.set(node.outputs[0], None)
        return
    # Align axes from the right; operands whose channel dim is 1 broadcast and need no coupling.
    full: list[TensorChannels] = []
    axis_out = None
    for t, info in zip(acts, infos, strict=True):
        shp = g.shape(t)
        a_out = info.axis + out_rank - len(shp)
        if axis_out is None:
            axis_out = a_out
        if a_out != axis_out:
            an.freeze(info, f"{node.op} '{node.name}' aligns channel axes differently")
            an.set(node.outputs[0], None)
            return
        if info.features > 1:  # a channel dim of 1 broadcasts: nothing to couple
            full.append(TensorChannels(a_out, info.segs))
    if not full:
        an.set(node.outputs[0], None)
        return
    base = full[0]
    for other in full[1:]:
        an.couple(base, other, node.name)
    for i, t in enumerate(node.inputs):
        c = g.constant(t)
        if c is None or c.size == 1:
            continue
        a_c = axis_out - (out_rank - c.ndim)
        if a_c < 0 or c.shape[a_c] == 1:
            continue
        if c.shape[a_c] != base.features:
            an.freeze(base, f"constant of {node.op} '{node.name}' does not match the channels")
            break
        _const_uses(an, node, base, "param", i, a_c)
    an.set(node.outputs[0], base)


@_handles("Concat")
def _concat(an: _Analyzer, node: Node) -> None:
    g = an.g
    rank = g.rank(node.outputs[0])
    if rank is None:
        an.freeze_inputs(node)
        return
    axis = int(node.attrs.get("axis", 0)) % rank
    infos = []
    for t in node.inputs:
        info = an.get(t)
        if info is None:
            info = an.fresh(t, node, axis, f"an input of Concat '{node.name}' is not analyzable")
        infos.append(info)
    if any(i is None for i in infos):
        for i in infos:
            an.freeze(i, f"an input of Concat '{node.name}' has an unknown size")
        return
    if all(i.axis == axis for i in infos):
        an.set(node.outputs[0], TensorChannels(axis, tuple(s for i in infos for s in i.segs)))
        return
    # Concatenation along another axis (batch or space): the channels are shared.
    if all(i.axis == infos[0].axis for i in infos):
        for other in infos[1:]:
            an.couple(infos[0], other, node.name)
        an.set(node.outputs[0], infos[0])
        return
    for i in infos:
        an.freeze(i, f"Concat '{node.name}' mixes channel axes")


@_handles("Split")
def _split(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = g.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % rank
    if axis != x.axis:
        for o in node.outputs:
            an.set(o, x)
        return
    sizes = [g.shape(o)[axis] if g.shape(o) else None for o in node.outputs]
    ok = all(isinstance(s, int) for s in sizes) and (
        len(node.inputs) < 2 or not node.inputs[1].name or g.constant(node.inputs[1]) is not None
    )
    parts: list[list[Seg]] = []
    if ok:
        segs, pos = list(x.segs), 0
        for size in sizes:
            part, acc = [], 0
            while acc < size and pos < len(segs):
                part.append(segs[pos])
                acc += segs[pos].length * segs[pos].rep
                pos += 1
            if acc != size:
                ok = False
                break
            parts.append(part)
    if not ok or len(node.inputs) < 2 and "split" not in node.attrs and len({*sizes}) > 1:
        an.freeze(x, f"Split '{node.name}' cuts through a channel set")
        for o in node.outputs:
            an.set(o, an.fresh(o, node, axis, f"output of Split '{node.name}' that cuts a channel set"))
        return
    if len(node.inputs) < 2 or not node.inputs[1].name:
        # Equal split without sizes: pruning must keep the parts equal, so tie them.
        for part in parts[1:]:
            an.couple(TensorChannels(axis, tuple(parts[0])), TensorChannels(axis, tuple(part)), node.name)
    else:
        an.fixups.append(("split", node))
    for o, part in zip(node.outputs, parts, strict=True):
        an.set(o, TensorChannels(axis, tuple(part)))


def _flatten_like(
    an: _Analyzer, node: Node, x: TensorChannels, in_shape: tuple, out_shape: tuple
) -> TensorChannels | None:
    """Channel map after a reshape, or None if channels do not survive it intact."""
    if not all(isinstance(d, int) for d in in_shape[1:]) or not all(isinstance(d, int) for d in out_shape[1:]):
        return None
    lead = math.prod(in_shape[1 : x.axis]) if x.axis > 1 else 1
    tail = math.prod(in_shape[x.axis + 1 :])
    feats = in_shape[x.axis]
    # Find the output axis whose leading product matches.
    for a in range(1, len(out_shape)):
        if math.prod(out_shape[1:a]) != lead:
            continue
        if out_shape[a] == feats and math.prod(out_shape[a + 1 :]) == tail:
            return TensorChannels(a, x.segs)
        if out_shape[a] == feats * tail and a == len(out_shape) - 1:
            return TensorChannels(a, tuple(Seg(s.root, s.length, s.rep * tail, s.start) for s in x.segs))
    return None


@_handles("Flatten", "Reshape")
def _reshape(an: _Analyzer, node: Node) -> None:
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if node.op == "Reshape" and g.constant(node.inputs[1]) is None:
        an.freeze(x, f"Reshape '{node.name}' has a computed shape")
        return
    out = _flatten_like(an, node, x, in_shape, out_shape) if in_shape and out_shape else None
    if out is None:
        an.freeze(x, f"{node.op} '{node.name}' reorders channels (e.g. a channel shuffle)")
        an.set(node.outputs[0], None)
        return
    if node.op == "Reshape":
        an.fixups.append(("reshape", node))
    an.set(node.outputs[0], out)


@_handles("Transpose")
def _transpose(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = an.g.rank(node.inputs[0])
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    if any(s.rep != 1 for s in x.segs):
        an.freeze(x, f"Transpose '{node.name}' moves flattened features")
        return
    an.set(node.outputs[0], TensorChannels(perm.index(x.axis), x.segs))


@_handles("Squeeze", "Unsqueeze")
def _squeeze(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    in_shape, out_shape = an.g.shape(node.inputs[0]), an.g.shape(node.outputs[0])
    out = _flatten_like(an, node, x, in_shape, out_shape) if in_shape and out_shape else None
    if out is None or out.segs != x.segs:
        an.freeze(x, f"{node.op} '{node.name}' touches the channel axis")
        return
    an.set(node.outputs[0], out)


@_handles("Slice")
def _slice(an: _Analyzer, node: Node) -> None:
    """Slicing other axes (a spatial crop) keeps the channels; slicing the channel axis freezes them."""
    g = an.g
    x = an.get(node.inputs[0])
    if x is None:
        return
    rank = g.rank(node.inputs[0])
    starts = g.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    axes_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    axes = g.constant(axes_t) if axes_t is not None else (np.arange(len(starts)) if starts is not None else None)
    if rank is None or axes is None or x.axis in [int(a) % rank for a in np.asarray(axes).reshape(-1)]:
        an.freeze(x, f"Slice '{node.name}' cuts the channel axis (or its axes are not constant)")
        an.set(node.outputs[0], None)
        return
    an.set(node.outputs[0], x)


@_handles("Pad")
def _pad(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    pads = an.g.constant(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
    rank = an.g.rank(node.inputs[0])
    if pads is None or len(node.inputs) > 3 and node.inputs[3].name:
        an.freeze(x, f"Pad '{node.name}' has computed pads or explicit axes")
        return
    pads = pads.reshape(-1)
    if len(pads) != 2 * rank or pads[x.axis] != 0 or pads[x.axis + rank] != 0:
        an.freeze(x, f"Pad '{node.name}' pads the channel axis")
        return
    an.set(node.outputs[0], x)


@_handles("Resize", "Upsample")
def _resize(an: _Analyzer, node: Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    g = an.g
    in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    sizes = g.constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if sizes is not None or not in_shape or not out_shape or in_shape[x.axis] != out_shape[x.axis]:
        an.freeze(x, f"{node.op} '{node.name}' fixes the channel count or scales channels")
        return
    an.set(node.outputs[0], x)


@_handles(
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL1",
    "ReduceL2",
    "ReduceProd",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
)
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
        else:
            an.set(node.outputs[0], x)
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        c = g.constant(node.inputs[1])
        axes = None if c is None else c.tolist()
    if axes is None or x.axis in [a % rank for a in axes]:
        an.freeze(x, f"{node.op} '{node.name}' reduces over the channels")
        return
    if node.attrs.get("keepdims", 1):
        an.set(node.outputs[0], x)
    else:
        shift = sum(1 for a in axes if a % rank < x.axis)
        an.set(node.outputs[0], TensorChannels(x.axis - shift, x.segs))


def channel_groups(graph: Graph, ctx: Any = None) -> ChannelAnalysis:
    """The analysis (usable as ``ctx.analysis(channel_groups, graph)``). Needs inferred shapes."""
    return _Analyzer(graph).run()
