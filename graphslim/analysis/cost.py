"""Cost model: parameters, MACs, bytes and weight sparsity per layer and in total.

Counts are for one sample (symbolic leading dims are taken as 1). MACs cover the multiply-add ops
(Conv incl. groups and strides, ConvTranspose, Gemm, MatMul with batch dims); pooling and
elementwise work is counted separately as ``other_ops`` (one op per output element, times the
window for pooling). Weight layers with zeros also report their block sparsity for the block
shapes the backend's sparse kernels use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphslim.analysis.sparsity import STANDARD_BLOCKS, block_sparsity
from graphslim.core.ir import Graph, Node
from graphslim.core.patterns import weight_matrix

__all__ = ["CostReport", "LayerCost", "cost_model", "layer_macs"]

_POOL = {"MaxPool", "AveragePool", "LpPool"}
_GLOBAL_POOL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_NO_COMPUTE = {
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Shape",
    "Constant",
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Dropout",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
}


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
        }
        if layers:
            d["layers"] = [lc.to_dict() for lc in self.layers]
        return d


def _prod(xs: Any) -> int:
    return int(np.prod([int(x) for x in xs], dtype=np.int64)) if len(xs) else 1


def layer_macs(graph: Graph, node: Node) -> tuple[int, int]:
    """(MACs, other element ops) of one node, for batch 1; (0, 0) where shapes are unknown."""
    op = node.op
    out = graph.int_shape(node.outputs[0]) if node.outputs else None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = node.inputs[3 if op == "QLinearConv" else 1]
        wshape = graph.int_shape(w)
        if out is None or wshape is None:
            return 0, 0
        return out[0] * out[1] * _prod(out[2:]) * _prod(wshape[1:]), 0
    if op == "ConvTranspose":
        x = graph.int_shape(node.inputs[0])
        wshape = graph.int_shape(node.inputs[1])
        if x is None or wshape is None:
            return 0, 0
        return x[0] * x[1] * _prod(x[2:]) * _prod(wshape[1:]), 0
    if op == "Gemm":
        a = graph.int_shape(node.inputs[0])
        if out is None or a is None:
            return 0, 0
        k = a[0] if node.attrs.get("transA", 0) else a[1]
        return _prod(out) * k, 0
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = graph.int_shape(node.inputs[0])
        if out is None or a is None:
            return 0, 0
        return _prod(out) * a[-1], 0
    if out is None or op in _NO_COMPUTE:
        return 0, 0
    if op in _POOL:
        return 0, _prod(out) * _prod(node.attrs.get("kernel_shape", [1]))
    if op in _GLOBAL_POOL:
        x = graph.int_shape(node.inputs[0])
        return 0, _prod(x) if x else 0
    return 0, _prod(out)


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


def cost_model(graph: Graph, ctx: Any = None) -> CostReport:
    """The analysis: usable as ``ctx.analysis(cost_model, graph)``."""
    layers: list[LayerCost] = []
    seen: set[int] = set()
    total_params = total_bytes = total_zeros = total_float = 0
    total_macs = total_other = 0
    for node in graph.nodes:
        params = nbytes = zeros = nfloat = 0
        for t in node.inputs:
            val = graph.constant(t)
            if val is None:
                continue
            params += val.size
            nbytes += val.nbytes
            if val.dtype.kind == "f":
                nfloat += val.size
                zeros += int(val.size - np.count_nonzero(val))
            if id(t) not in seen:
                seen.add(id(t))
                total_params += val.size
                total_bytes += val.nbytes
                if val.dtype.kind == "f":
                    total_float += val.size
                    total_zeros += int(val.size - np.count_nonzero(val))
        if node.op == "Constant":
            continue  # its value is counted where it is used
        macs, other = layer_macs(graph, node)
        total_macs += macs
        total_other += other
        shp = graph.shape(node.outputs[0]) if node.outputs else None
        layer = LayerCost(
            node.name, node.op, params, macs, other, nbytes, zeros, nfloat, list(shp) if shp is not None else None
        )
        if node.op in ("Conv", "Gemm", "MatMul") and zeros:
            m = weight_matrix(graph, node)
            if m is not None:
                layer.extra["block_sparsity"] = {
                    f"{b[0]}x{b[1]}": round(block_sparsity(m, b), 6) for b in STANDARD_BLOCKS
                }
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger") and len(node.inputs) > 1:
            layer.extra.update(_weight_info(graph, node))
        layers.append(layer)
    io = []
    for group in (graph.inputs, graph.outputs):
        io.append(
            [
                {
                    "name": t.name,
                    "shape": list(graph.shape(t) or []),
                    "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None,
                }
                for t in group
            ]
        )
    return CostReport(
        params=total_params,
        macs=total_macs,
        other_ops=total_other,
        size_bytes=graph.serialized_size(),
        weight_bytes=total_bytes,
        sparsity=total_zeros / total_float if total_float else 0.0,
        nodes=len(graph.nodes),
        op_counts=dict(sorted(Counter(n.op for n in graph.nodes).items())),
        layers=layers,
        inputs=io[0],
        outputs=io[1],
    )
