"""Cost model: parameters, MACs, bytes and weight sparsity per layer and in total.

Counts are for the shapes the graph's symbolic dims take under ``bindings`` (from ``--shape
input_ids=1x128``; every unbound dim is 1, and the report lists the binding used). MACs come from
the op table (:func:`graphslim.core.ops.node_macs`): Conv incl. groups and strides, ConvTranspose,
Gemm, MatMul with any leading dims (the attention matmuls QK^T and scores x V included); pooling
and elementwise work is counted separately as ``other_ops``. Parameters are the elements of the
constants the nodes read, except int64 and bool ones (shapes and indices). Weight layers with zeros
also report their block sparsity for the block shapes the backend's sparse kernels use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphslim.analysis.sparsity import STANDARD_BLOCKS, block_sparsity
from graphslim.core.ir import Graph, Node
from graphslim.core.ops import node_macs, op_info, weight_matrix

__all__ = ["CostReport", "LayerCost", "bind_dims", "cost_by_type", "cost_model", "layer_name"]

_NOT_PARAMS = ("int64", "bool")


def layer_name(node: Node) -> str:
    """A node's name, or its first output's name for unnamed nodes (common in hand-built and older
    exports)."""
    if node.name:
        return node.name
    return next((o.name for o in node.outputs if o.name), node.op)


def bind_dims(graph: Graph, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Values for the symbolic dims of the graph's inputs: from ``shapes`` (input name -> dims,
    e.g. ``{"input_ids": (1, 128)}``), else 1. Raises ValueError for a shape that does not fit."""
    out: dict[str, int] = {}
    by_name = {t.name: t for t in graph.inputs}
    for name, dims in (shapes or {}).items():
        t = by_name.get(name)
        if t is None:
            raise ValueError(f"--shape names '{name}', which is not a model input (inputs: {', '.join(by_name)})")
        shp = graph.shape(t) or ()
        if len(shp) != len(dims):
            raise ValueError(f"--shape {name}: {len(dims)} dims given, the input has {len(shp)} ({list(shp)})")
        for d, v in zip(shp, dims, strict=True):
            if isinstance(d, int) and d >= 0 and d != v:
                raise ValueError(f"--shape {name}: dim {d} is fixed in the model, {v} given")
            if isinstance(d, str) and d != "?":
                if out.get(d, v) != v:
                    raise ValueError(f"--shape: dim '{d}' bound to both {out[d]} and {v}")
                out[d] = int(v)
    for t in graph.inputs:
        for d in graph.shape(t) or ():
            if isinstance(d, str) and d != "?" and d not in out:
                out[d] = 1
    return out


@dataclass
class LayerCost:
    name: str
    op: str
    params: int
    macs: int
    other_ops: int
    bytes: int
    zeros: int  # exact zeros among the float weight elements
    float_params: int
    output_shape: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.float_params if self.float_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "params": self.params,
            "macs": self.macs,
            "other_ops": self.other_ops,
            "bytes": self.bytes,
            "sparsity": round(self.sparsity, 6),
            "output_shape": self.output_shape,
            **self.extra,
        }


@dataclass
class CostReport:
    params: int
    macs: int
    other_ops: int
    size_bytes: int
    weight_bytes: int
    sparsity: float
    nodes: int
    op_counts: dict[str, int]
    layers: list[LayerCost]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    bindings: dict[str, int] = field(default_factory=dict)  # symbolic dim -> value the counts use

    def to_dict(self, *, layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "params": self.params,
            "macs": self.macs,
            "flops": 2 * self.macs,
            "other_ops": self.other_ops,
            "size_bytes": self.size_bytes,
            "weight_bytes": self.weight_bytes,
            "sparsity": round(self.sparsity, 6),
            "nodes": self.nodes,
            "op_counts": self.op_counts,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "bindings": self.bindings,
        }
        if layers:
            d["layers"] = [lc.to_dict() for lc in self.layers]
        return d


def _weight_info(graph: Graph, node: Node) -> dict[str, Any]:
    """Precision of a layer's weight (float32, int8, binary) and its element count, looking
    through a DequantizeLinear that feeds it."""
    w = node.inputs[1]
    val = graph.constant(w)
    if val is not None:
        return {"precision": str(val.dtype), "weight_params": int(val.size)}
    prod = graph.producer(w)
    if prod is not None and prod.op == "DequantizeLinear":
        q = graph.constant(prod.inputs[0])
        if q is not None:
            binary = q.dtype == np.int8 and q.size > 0 and set(np.unique(q).tolist()) <= {-1, 1}
            return {"precision": "binary" if binary else str(q.dtype), "weight_params": int(q.size)}
    return {"precision": "dynamic", "weight_params": 0}


def cost_model(graph: Graph, ctx: Any = None, *, bindings: dict[str, int] | None = None) -> CostReport:
    """The analysis: usable as ``ctx.analysis(cost_model, graph)`` (the context's
    ``shape_bindings`` bind symbolic dims; default 1)."""
    if bindings is None:
        bindings = bind_dims(graph, getattr(ctx, "shapes", None) or None) if ctx is not None else bind_dims(graph)
    layers: list[LayerCost] = []
    seen: set[int] = set()
    totals = _Totals()
    for node in graph.nodes:
        params, nbytes, zeros, nfloat = _count_constants(graph, node, seen, totals)
        if node.op == "Constant":
            continue  # its value is counted where it is used
        macs, other = node_macs(graph, node, bindings)
        totals.macs += macs
        totals.other += other
        shp = graph.shape(node.outputs[0]) if node.outputs else None
        layer = LayerCost(
            layer_name(node),
            node.op,
            params,
            macs,
            other,
            nbytes,
            zeros,
            nfloat,
            list(shp) if shp is not None else None,
        )
        _add_weight_extras(graph, node, layer)
        layers.append(layer)
    return CostReport(
        params=totals.params,
        macs=totals.macs,
        other_ops=totals.other,
        size_bytes=graph.serialized_size(),
        weight_bytes=totals.bytes,
        sparsity=totals.zeros / totals.floats if totals.floats else 0.0,
        nodes=len(graph.nodes),
        op_counts=dict(sorted(Counter(n.op for n in graph.nodes).items())),
        layers=layers,
        inputs=_io_specs(graph, graph.inputs),
        outputs=_io_specs(graph, graph.outputs),
        bindings=dict(sorted(bindings.items())),
    )


@dataclass
class _Totals:
    """The whole model's sums; constants shared by several nodes count once."""

    params: int = 0
    bytes: int = 0
    zeros: int = 0  # zero float weights
    floats: int = 0  # float weights
    macs: int = 0
    other: int = 0


def _count_constants(graph: Graph, node: Node, seen: set[int], totals: _Totals) -> tuple[int, int, int, int]:
    """(params, bytes, zero floats, floats) of the node's constant inputs; adds those not ``seen``
    yet to ``totals``."""
    params = nbytes = zeros = nfloat = 0
    for t in node.inputs:
        val = graph.constant(t)
        if val is None or val.dtype.name in _NOT_PARAMS:
            continue
        params += val.size
        nbytes += val.nbytes
        if val.dtype.kind == "f":
            nfloat += val.size
            zeros += int(val.size - np.count_nonzero(val))
        if id(t) not in seen:
            seen.add(id(t))
            totals.params += val.size
            totals.bytes += val.nbytes
            if val.dtype.kind == "f":
                totals.floats += val.size
                totals.zeros += int(val.size - np.count_nonzero(val))
    return params, nbytes, zeros, nfloat


def _add_weight_extras(graph: Graph, node: Node, layer: LayerCost) -> None:
    """Block sparsity of a sparse Conv/Gemm/MatMul weight, and a weighted layer's precision."""
    if node.op in ("Conv", "Gemm", "MatMul") and layer.zeros:
        m = weight_matrix(graph, node)
        if m is not None:
            layer.extra["block_sparsity"] = {f"{b[0]}x{b[1]}": round(block_sparsity(m, b), 6) for b in STANDARD_BLOCKS}
    info = op_info(node.op, node.domain)
    weighted = info is not None and (info.weight is not None or "quantized" in info.roles)
    if weighted and node.op != "Gather" and len(node.inputs) > 1:
        layer.extra.update(_weight_info(graph, node))


def _io_specs(graph: Graph, group: Any) -> list[dict[str, Any]]:
    """Name, shape and dtype of each graph input (or output) in ``group``."""
    return [
        {
            "name": t.name,
            "shape": list(graph.shape(t) or []),
            "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None,
        }
        for t in group
    ]


def cost_by_type(graph: Graph, report: CostReport, types: dict[int, str]) -> dict[str, dict[str, int]]:
    """Parameters, MACs and weight bytes per layer type (``types``: id(node) -> "attention",
    "ffn", "embeddings", from :meth:`ChannelAnalysis.layer_types`; the rest is "other")."""
    nodes = [n for n in graph.nodes if n.op != "Constant"]  # the order cost_model lists layers in
    out: dict[str, dict[str, int]] = {}
    for node, layer in zip(nodes, report.layers, strict=True):
        row = out.setdefault(types.get(id(node), "other"), {"params": 0, "macs": 0, "bytes": 0})
        row["params"] += layer.params
        row["macs"] += layer.macs
        row["bytes"] += layer.bytes
    order = ["embeddings", "attention", "ffn", "other"]
    return {k: out[k] for k in order if k in out}
