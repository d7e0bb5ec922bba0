"""quantize-binary: binary (XNOR-Net style) weights, W ~ alpha * sign(W).

For each selected Conv or Gemm (or MatMul) with a constant float weight, alpha is the mean |W|
per output channel (``scale=per_channel``) or over the whole tensor (``per_tensor``), and the
weight becomes an int8 initializer in {-1, +1} read through a DequantizeLinear whose scale is
alpha. The graph stays standard ONNX and runs anywhere (opset >= 13 for per-channel scales); the
TVM backend maps these layers to bit-serial kernels with 1-bit packed weights.

The first and last weight layers stay in higher precision by default (``skip_first_last``,
standard practice). ``op_types`` defaults to Conv and Gemm: binarizing a transformer's MatMuls
without retraining destroys it, so MatMul is opt-in (``op_types=[Conv,Gemm,MatMul]``), and every
weight layer left alone is listed with the reason. With ``--data`` the report gives each
binarized layer's cost when it alone is binarized, in points of the model's metric
(:mod:`graphslim.core.metrics`), measured in one session with a switch per layer on a fixed
subset of ``sensitivity_samples`` samples (0: 32 for continuous metrics, 256 for accuracy or
agreement, down to 4 for large models so that the scan stays near a minute); ``sensitivity=false``
skips it. ``layers`` restricts the pass to named nodes.
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
        sensitivity: bool = True
        sensitivity_samples: int = 0

        def __post_init__(self) -> None:
            bad = set(self.op_types) - {"Conv", "Gemm", "MatMul"}
            if bad:
                raise ValueError(f"op_types can be Conv, Gemm, MatMul (not {', '.join(sorted(bad))})")
            if self.sensitivity_samples < 0:
                raise ValueError("sensitivity_samples must be >= 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        per_channel = o.scale == "per_channel"
        chosen, skipped = self._choose_layers(graph, per_channel)
        per_layer_cost: dict[str, float] = {}
        stats: dict = {}
        if ctx.data is not None and o.sensitivity and chosen:
            per_layer_cost = self._layer_costs(graph, ctx, chosen, per_channel, stats)
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
                entry["drop_points_alone"] = round(per_layer_cost[node.name], 4)
                # the key before the metric module, kept: points of the model's metric
                entry["accuracy_drop_points_alone"] = entry["drop_points_alone"]
            layers.append(entry)
        not_run = None
        if not chosen:
            not_run = "no layer to binarize: " + (
                "; ".join(sorted({s.reason for s in skipped})) or "no Conv/Gemm/MatMul with a constant float weight"
            )
        return PassResult(
            changed=bool(chosen),
            stats={"binarized": len(chosen), "layers": layers, **stats},
            skipped=skipped,
            not_run=not_run,
        )

    def _choose_layers(self, graph: Graph, per_channel: bool) -> tuple[list[Node], list[Skip]]:
        """The layers to binarize (in graph order), and why each other candidate is left alone."""
        o = self.options
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
                skipped.append(
                    Skip(
                        node.name, f"op type {node.op} is not in op_types=[{','.join(o.op_types)}] (add it to binarize)"
                    )
                )
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
        return chosen, skipped

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

    def _layer_costs(
        self, graph: Graph, ctx: PassContext, chosen: list[Node], per_channel: bool, stats: dict
    ) -> dict[str, float]:
        """Points of the model's metric lost when each chosen layer alone is binarized."""
        from tqdm import tqdm

        from graphslim.core.metrics import Evaluator
        from graphslim.transforms.quantization import Layer, Probe, scan_samples, sensitivity_subset

        layers, fakes = [], {}
        for node in chosen:
            w = graph.constant(node.inputs[1])
            axis = _out_axis(node, w.ndim)
            signs, alpha = binarize(w, axis, per_channel)
            shape = [1] * w.ndim
            shape[axis] = -1
            fakes[node.name] = (signs.astype(w.dtype) * (alpha.reshape(shape) if alpha.ndim else alpha)).astype(w.dtype)
            layers.append(Layer(node.name, node.op, 1, axis, int(w.size)))
        probe = Probe(graph, layers, {n.name: ["weight"] for n in chosen}, fake_weights=fakes).build()
        subset = sensitivity_subset(ctx.data, 0)
        model = graph.to_model()
        pilot = subset.take(2)  # the metric decides the subset's size
        spec = Evaluator(model, pilot, metric=ctx.metric, reference_outputs=probe.run(pilot, {})).spec
        subset = subset.take(scan_samples(graph, subset, spec.name, len(chosen), self.options.sensitivity_samples))
        ev = Evaluator(model, subset, metric=ctx.metric, reference_outputs=probe.run(subset, {}))
        stats.update(
            {"metric": ev.spec.name, "metric_description": ev.spec.describe(), "sensitivity_samples": len(ev.data)}
        )
        costs = {}
        for node in tqdm(
            chosen, desc="quantize-binary sensitivity", unit="layer", disable=not ctx.progress, leave=False
        ):
            costs[node.name] = ev.drop_points(ev.score_outputs(probe.run(ev.data, {node.name: "weight"})))
        return costs
