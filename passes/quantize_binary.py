"""quantize-binary: binary (XNOR-Net style) weights, W ~ alpha * sign(W).

For each selected Conv or Gemm (or MatMul) with a constant float weight, alpha is the mean |W|
per output channel (``scale=per_channel``) or over the whole tensor (``per_tensor``), and the
weight becomes an int8 initializer in {-1, +1} read through a DequantizeLinear whose scale is
alpha. The graph stays standard ONNX and runs anywhere (opset >= 13 for per-channel scales); the
TVM backend maps these layers to bit-serial kernels with 1-bit packed weights.

The first and last weight layers stay in higher precision by default (``skip_first_last``,
standard practice). With labelled ``--data`` the report gives each binarized layer's accuracy
cost when it alone is binarized. ``layers`` restricts the pass to named nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphslim.core.ir import Graph, Node
from graphslim.core.ops import weight_axes
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass


def _out_axis(node: Node, ndim: int) -> int:
    return weight_axes(node, ndim)[0]  # type: ignore[index]


def binarize(w: np.ndarray, axis: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(signs as int8 in {-1, +1}, alpha): W ~ alpha * signs, alpha = mean |W| (per output channel)."""
    signs = np.where(w >= 0, 1, -1).astype(np.int8)
    if per_channel:
        other = tuple(i for i in range(w.ndim) if i != axis)
        alpha = np.abs(w).mean(axis=other).astype(w.dtype)
    else:
        alpha = np.asarray(np.abs(w).mean(), dtype=w.dtype)
    return signs, alpha


@register_pass
class QuantizeBinary(Pass):
    name = "quantize-binary"
    exact = False

    @dataclass(frozen=True)
    class Options:
        layers: tuple[str, ...] = ()
        op_types: tuple[str, ...] = ("Conv", "Gemm")
        skip_first_last: bool = True
        scale: Literal["per_channel", "per_tensor"] = "per_channel"

        def __post_init__(self) -> None:
            bad = set(self.op_types) - {"Conv", "Gemm", "MatMul"}
            if bad:
                raise ValueError(f"op_types can be Conv, Gemm, MatMul (not {', '.join(sorted(bad))})")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        per_channel = o.scale == "per_channel"
        skipped: list[Skip] = []
        graph.toposort()
        weighted = [
            n
            for n in graph.nodes
            if n.op in ("Conv", "Gemm", "MatMul")
            and len(n.inputs) > 1
            and (w := graph.constant(n.inputs[1])) is not None
            and w.dtype.kind == "f"
        ]
        chosen = []
        for i, node in enumerate(weighted):
            if o.layers and node.name not in o.layers:
                continue
            if not o.layers and node.op not in o.op_types:
                continue
            if o.skip_first_last and not o.layers and (i == 0 or i == len(weighted) - 1):
                skipped.append(
                    Skip(node.name, "first or last weight layer stays in higher precision (skip_first_last)")
                )
                continue
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                skipped.append(Skip(node.name, "Gemm with transA"))
                continue
            if per_channel and graph.opset < 13:
                skipped.append(
                    Skip(node.name, f"per-channel DequantizeLinear needs opset 13 (model has {graph.opset})")
                )
                continue
            chosen.append(node)
        missing = set(o.layers) - {n.name for n in weighted}
        skipped += [
            Skip(name, "no Conv/Gemm/MatMul with a constant float weight has this name") for name in sorted(missing)
        ]
        per_layer_cost = self._layer_costs(graph, ctx, chosen, per_channel) if ctx.data is not None else {}
        layers = []
        for node in chosen:
            w = graph.constant(node.inputs[1])
            axis = _out_axis(node, w.ndim)
            signs, alpha = binarize(w, axis, per_channel)
            self._rewrite(graph, node, signs, alpha, axis)
            entry = {
                "name": node.name,
                "op": node.op,
                "weights": int(w.size),
                "alpha_mean": round(float(np.mean(alpha)), 6),
            }
            if node.name in per_layer_cost:
                entry["accuracy_drop_points_alone"] = round(per_layer_cost[node.name], 4)
            layers.append(entry)
        return PassResult(changed=bool(chosen), stats={"binarized": len(chosen), "layers": layers}, skipped=skipped)

    @staticmethod
    def _rewrite(graph: Graph, node: Node, signs: np.ndarray, alpha: np.ndarray, axis: int) -> None:
        zero = np.zeros(alpha.shape, dtype=np.int8)
        dq_out = graph.make_variable(f"{node.name}_wbin", dtype=alpha.dtype, shape=list(signs.shape))
        attrs = {"axis": axis} if alpha.ndim else {}
        graph.add_node(
            "DequantizeLinear",
            [
                graph.make_constant(signs, f"{node.name}_sign"),
                graph.make_constant(alpha, f"{node.name}_alpha"),
                graph.make_constant(zero, f"{node.name}_zp"),
            ],
            [dq_out],
            attrs,
            name=f"{node.name}_binary",
        )
        graph.set_input(node, 1, dq_out)

    def _layer_costs(self, graph: Graph, ctx: PassContext, chosen: list[Node], per_channel: bool) -> dict[str, float]:
        """Accuracy (or top-1 agreement) lost when each chosen layer alone is binarized."""
        from graphslim.core.metrics import compare_outputs
        from graphslim.core.runtime import run_model

        data = ctx.data.take(1000)
        base_model = graph.to_model()
        ref = run_model(base_model, data)

        def score(outs: list[np.ndarray]) -> float:
            if data.labels is not None and outs[0].ndim == 2:
                return float(np.mean(np.argmax(outs[0], 1) == data.labels))
            fid = compare_outputs(ref, outs)
            return fid.top1_agreement if fid.top1_agreement is not None else fid.cosine

        base = score(ref)
        costs = {}
        for node in chosen:
            trial = graph.copy()
            tnode = next(n for n in trial.nodes if n.name == node.name)
            w = trial.constant(tnode.inputs[1])
            axis = _out_axis(tnode, w.ndim)
            signs, alpha = binarize(w, axis, per_channel)
            trial.set_constant(
                tnode,
                1,
                (
                    signs.astype(w.dtype)
                    * (np.expand_dims(alpha, tuple(i for i in range(w.ndim) if i != axis)) if alpha.ndim else alpha)
                ).astype(w.dtype),
            )
            costs[node.name] = 100 * (base - score(run_model(trial.to_model(), data)))
        return costs
