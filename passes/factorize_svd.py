"""factorize-svd: low-rank factorization of weights by truncated SVD.

- Gemm / MatMul with a constant weight W (K x N): W ~ (U_k sqrt(S_k)) (sqrt(S_k) V_k^T), the layer
  becomes two matmuls of rank k; a Gemm keeps its bias, alpha and beta on the second one. Batched
  MatMul weights (rank > 2, transformer style) are factorized per batch matrix at one rank.
- Conv (groups = 1): spatial-then-pointwise. The weight reshaped to out x (in*kh*kw) is
  factorized; a kh x kw Conv to k channels (with the original strides, pads and dilations) is
  followed by a 1 x 1 Conv to the original outputs, which keeps the bias.

The rank comes from ``energy`` (smallest k keeping that fraction of sum(S^2)), ``rank_ratio`` (of
min(m, n)) or a fixed ``rank``; with none given, energy=0.9. ``layer_ranks=["fc1=0.25", ...]``
gives single layers (by node name) their own rank ratio; with ``layer_ranks`` and none of
energy, rank_ratio and rank, only the layers it names are factorized (what ``graphslim search``
writes: a rank or none per layer). A layer is left alone unless the
factorized form saves at least ``min_saving`` of its parameters and MACs (both scale with
k(m + n) / (m n) here). The report lists each layer's rank and the energy kept.

Leaves alone, with the reason: grouped convs, transposed Gemm inputs, non-constant weights,
layers in ``exclude``, and layers where the saving is too small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.core.ir import Graph, Node
from graphslim.core.ops import weight_matrix
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, parse_layer_values, register_pass

_OPS = ("Gemm", "MatMul", "Conv")


def _choose_rank(s: np.ndarray, o: FactorizeSVD.Options, layer_ratio: float | None = None) -> int:
    """Rank for singular values ``s`` (1-D, or 2-D for batched weights: energy over the batch);
    ``layer_ratio`` (from layer_ranks) overrides the options."""
    full = s.shape[-1]
    if layer_ratio is not None:
        return max(1, min(full, int(round(layer_ratio * full))))
    if o.rank is not None:
        return max(1, min(o.rank, full))
    if o.rank_ratio is not None:
        return max(1, min(full, int(round(o.rank_ratio * full))))
    energy = o.energy if o.energy is not None else 0.9
    sq = (s.astype(np.float64) ** 2).reshape(-1, full).sum(axis=0)
    cum = np.cumsum(sq) / max(sq.sum(), 1e-300)
    return int(min(full, np.searchsorted(cum, energy - 1e-12) + 1))


def _energy_kept(s: np.ndarray, k: int) -> float:
    sq = (s.astype(np.float64) ** 2).reshape(-1, s.shape[-1]).sum(axis=0)
    return float(sq[:k].sum() / sq.sum()) if sq.sum() > 0 else 1.0


@register_pass
class FactorizeSVD(Pass):
    name = "factorize-svd"
    exact = False

    @dataclass(frozen=True)
    class Options:
        energy: float | None = None
        rank_ratio: float | None = None
        rank: int | None = None
        min_saving: float = 0.1
        ops: tuple[str, ...] = _OPS
        exclude: tuple[str, ...] = ()
        layer_ranks: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            parse_layer_values("layer_ranks", self.layer_ranks, low=0.0, high=1.0, high_inclusive=True)
            if any(v <= 0 for v in self.per_layer().values()):
                raise ValueError("layer_ranks: rank ratios must be in (0, 1]")
            given = [x for x in (self.energy, self.rank_ratio, self.rank) if x is not None]
            if len(given) > 1:
                raise ValueError("give one of energy, rank_ratio and rank")
            if self.energy is not None and not 0.0 < self.energy <= 1.0:
                raise ValueError("energy must be in (0, 1]")
            if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
                raise ValueError("rank_ratio must be in (0, 1]")
            if self.rank is not None and self.rank < 1:
                raise ValueError("rank must be >= 1")
            if not 0.0 <= self.min_saving < 1.0:
                raise ValueError("min_saving must be in [0, 1)")
            bad = set(self.ops) - set(_OPS)
            if bad:
                raise ValueError(f"ops can be Gemm, MatMul, Conv (not {', '.join(sorted(bad))})")

        def per_layer(self) -> dict[str, float]:
            return parse_layer_values("layer_ranks", self.layer_ranks, low=0.0, high=1.0, high_inclusive=True)

        @property
        def only_listed(self) -> bool:
            """layer_ranks without a global rank choice: the other layers are left alone."""
            return bool(self.layer_ranks) and self.energy is None and self.rank_ratio is None and self.rank is None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        per_layer = o.per_layer()
        skipped: list[Skip] = []
        layers = []
        seen: set[str] = set()
        for node in list(graph.nodes):
            if node.op not in o.ops:
                continue
            if node.name in o.exclude:
                skipped.append(Skip(node.name, "excluded by the exclude option"))
                continue
            seen.add(node.name)
            if o.only_listed and node.name not in per_layer:
                continue
            why = self._factorize(graph, node, layers, per_layer.get(node.name))
            if why is not None:
                skipped.append(Skip(node.name, why))
        for name in sorted(set(per_layer) - seen):
            skipped.append(Skip(name, f"layer_ranks names no {'/'.join(o.ops)} node"))
        return PassResult(changed=bool(layers), stats={"layers": layers, "factorized": len(layers)}, skipped=skipped)

    def _factorize(self, graph: Graph, node: Node, layers: list, layer_ratio: float | None = None) -> str | None:
        w = graph.constant(node.inputs[1])
        if w is None or w.dtype.kind != "f":
            return "the weight is not a constant float tensor"
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            return "grouped convolution"
        if (
            node.op == "Conv"
            and len(node.inputs) > 2
            and node.inputs[2].name
            and graph.constant(node.inputs[2]) is None
        ):
            return "the bias is not constant"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA"
        if node.op == "MatMul" and (w.ndim < 2 or graph.constant(node.inputs[0]) is not None):
            return "MatMul without a constant weight as second input"
        # (inputs x outputs): the op table's (outputs x inputs) matrix, transposed; batched MatMul
        # weights (rank > 2, one matrix per batch entry) are factorized per matrix at one rank.
        outs_ins = weight_matrix(graph, node)
        mat = outs_ins.T if outs_ins is not None else w
        m, n = mat.shape[-2], mat.shape[-1]
        u, s, vt = np.linalg.svd(mat.astype(np.float64), full_matrices=False)
        k = _choose_rank(s, self.options, layer_ratio)
        saving = 1.0 - k * (m + n) / (m * n)
        if saving < self.options.min_saving:
            return f"rank {k} of {min(m, n)} saves {saving:.0%} of the parameters, less than min_saving"
        root = np.sqrt(s[..., :k])
        a = (u[..., :, :k] * root[..., None, :]).astype(w.dtype)  # K x k
        b = (root[..., :, None] * vt[..., :k, :]).astype(w.dtype)  # k x N
        self._rewrite(graph, node, a, b, k)
        layers.append(
            {
                "name": node.name,
                "op": node.op,
                "shape": [int(m), int(n)],
                "rank": int(k),
                "energy_kept": round(_energy_kept(s, k), 6),
                "param_saving": round(saving, 4),
            }
        )
        return None

    @staticmethod
    def _rewrite(graph: Graph, node: Node, a: np.ndarray, b: np.ndarray, k: int) -> None:
        x = node.inputs[0]
        mid = graph.make_variable(f"{node.name}_lowrank", dtype=None)
        if node.op == "Conv":
            w = graph.constant(node.inputs[1])
            first_w = a.T.reshape((k,) + w.shape[1:])  # k x in x kh x kw
            second_w = b.T.reshape(w.shape[0], k, *([1] * (w.ndim - 2)))  # out x k x 1 x 1
            attrs = {key: v for key, v in node.attrs.items() if key != "group"}
            graph.add_node(
                "Conv", [x, graph.make_constant(first_w, f"{node.name}_u")], [mid], attrs, name=f"{node.name}_spatial"
            )
            pointwise = {"kernel_shape": [1] * (w.ndim - 2)}
            graph.set_input(node, 0, mid)
            graph.set_constant(node, 1, second_w)
            graph.replace_attrs(node, pointwise)
            return
        if node.op == "Gemm":
            trans_b = int(node.attrs.get("transB", 0))
            graph.add_node("Gemm", [x, graph.make_constant(a, f"{node.name}_u")], [mid], name=f"{node.name}_u")
            graph.set_input(node, 0, mid)
            graph.set_constant(node, 1, np.ascontiguousarray(b.T) if trans_b else b)
            return
        graph.add_node("MatMul", [x, graph.make_constant(a, f"{node.name}_u")], [mid], name=f"{node.name}_u")
        graph.set_input(node, 0, mid)
        graph.set_constant(node, 1, b)
