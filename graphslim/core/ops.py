"""The op table: what graphslim knows about each ONNX op type, in one place.

ONNX keeps one schema per op (``onnx.defs.get_schema``); TVM registers each operator once with its
attributes. This table holds what graphslim's analyses and passes need on top of the schema, one
:class:`OpInfo` per op type:

- ``weight``: which input is a weight, which of its axes holds the output channels (``out``) and
  which the input channels (``in``), and which input is the bias. ``out x in`` is the one
  convention: :func:`weight_matrix` views every weight as an ``(outputs, inputs)`` matrix.
- ``params``: per-channel constant inputs (BatchNorm statistics, LayerNorm scale and bias, PRelu
  slope) and the axis of the activation they follow.
- ``channels``: how channels map from inputs to outputs, one of the :class:`Rule` names; the channel
  analysis (:mod:`graphslim.analysis.channels`) implements each rule once.
- ``macs``: multiply-accumulates (and other element operations) from shapes.
- ``roles``: ``prunable`` (starts a channel group), ``quantizable``, ``trainable`` (its float weight
  and bias train), ``bn_foldable`` (a following BatchNorm or per-channel affine folds into it),
  ``factorizable`` (truncated SVD), ``sparsifiable`` (block sparsity).

Adding support for an op is one entry here (and a test); an op without an entry is unknown to every
analysis, which then leaves whatever touches it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from graphslim.core.ir import Graph, Node

__all__ = [
    "OPS",
    "OpInfo",
    "ParamSpec",
    "Rule",
    "WeightSpec",
    "matrix_to_weight",
    "node_macs",
    "op_info",
    "out_channels",
    "scale_out_channels",
    "trainable_inputs",
    "weight_axes",
    "weight_matrix",
    "weight_node",
]


class Rule:
    """How an op maps channels (the channel analysis has one handler per rule)."""

    SAME = "same"  # output channels are the first input's (activations, pooling, Cast, Dropout)
    ELEMENTWISE = "elementwise"  # broadcasting n-ary op: the operands' channel axes are coupled
    WEIGHT = "weight"  # a weight op: new output channels; input channels index the weight's in axis
    MATMUL = "matmul"  # MatMul: a weight op with a constant B, else batch axes couple, contraction pairs
    NORM = "norm"  # per-channel params on axis 1 (BatchNorm, InstanceNorm)
    LAYER_NORM = "layer_norm"  # normalizes over the channel axis: pruning changes the statistics
    REDUCE = "reduce"  # ReduceMean & co.
    SOFTMAX = "softmax"
    CONCAT = "concat"
    SPLIT = "split"
    RESHAPE = "reshape"  # Reshape, Flatten
    SQUEEZE = "squeeze"  # Squeeze, Unsqueeze
    TRANSPOSE = "transpose"
    SLICE = "slice"
    PAD = "pad"
    RESIZE = "resize"
    GATHER = "gather"  # an embedding lookup (constant table), or indexing along a non-channel axis
    EXPAND = "expand"
    CLIP = "clip"
    SHAPE = "shape"  # reads only its input's shape (Shape, Size) or computes on integers: no channels
    OPAQUE = "opaque"  # rearranges elements in ways the analysis does not follow: freezes its inputs
    MIXES = "mixes"  # mixes neighbouring channels (LRN): freezes them


@dataclass(frozen=True)
class WeightSpec:
    """The weight input of a weight op; axes are functions of the node and the weight's rank."""

    index: int
    out_axis: Callable[[Node, int], int]
    in_axis: Callable[[Node, int], int | None]
    bias: int | None = None
    bias_axis: int = -1  # the bias's axis along the output channels


@dataclass(frozen=True)
class ParamSpec:
    """Per-channel constant inputs, indexed along ``axis`` of the activation (None: the op's ``axis``
    attribute, LayerNorm style)."""

    indices: tuple[int, ...]
    axis: int | None = 1


MacsFn = Callable[["Graph", "Node", "dict[str, int] | None"], "tuple[int, int]"]


@dataclass(frozen=True)
class OpInfo:
    op: str
    channels: str
    weight: WeightSpec | None = None
    params: ParamSpec | None = None
    macs: MacsFn | None = None
    roles: frozenset[str] = field(default_factory=frozenset)


OPS: dict[str, OpInfo] = {}


def _add(op: str, channels: str, **kw: object) -> None:
    roles = kw.pop("roles", ())
    OPS[op] = OpInfo(op, channels, roles=frozenset(roles), **kw)  # type: ignore[arg-type]


def op_info(op: str, domain: str | None = "") -> OpInfo | None:
    """The entry for an op of the default ONNX domain, or None (unknown: analyses leave it alone)."""
    if domain not in (None, "", "ai.onnx"):
        return None
    return OPS.get(op)


# --------------------------------------------------------------------------- MACs


def _prod(xs: object) -> int:
    return math.prod(int(x) for x in xs)  # type: ignore[union-attr]


def _conv_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    w = node.inputs[3 if node.op == "QLinearConv" else 1]
    out, ws = g.int_shape(node.outputs[0], b), g.int_shape(w, b)
    if out is None or ws is None:
        return 0, 0
    return _prod(out) * _prod(ws[1:]), 0


def _conv_transpose_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    x, ws = g.int_shape(node.inputs[0], b), g.int_shape(node.inputs[1], b)
    if x is None or ws is None:
        return 0, 0
    return _prod(x) * _prod(ws[1:]), 0


def _gemm_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    a, out = g.int_shape(node.inputs[0], b), g.int_shape(node.outputs[0], b)
    if a is None or out is None:
        return 0, 0
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return _prod(out) * k, 0


def _matmul_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    """Any leading (batch) dimensions: output elements times the contraction length. The
    attention matmuls (QK^T, scores x V) count like every other."""
    a, out = g.int_shape(node.inputs[0], b), g.int_shape(node.outputs[0], b)
    if a is None or out is None or not a:
        return 0, 0
    return _prod(out) * a[-1], 0


def _pool_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    out = g.int_shape(node.outputs[0], b)
    return (0, _prod(out) * _prod(node.attrs.get("kernel_shape", [1]))) if out is not None else (0, 0)


def _global_pool_macs(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    x = g.int_shape(node.inputs[0], b)
    return (0, _prod(x)) if x is not None else (0, 0)


def _elementwise_ops(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    out = g.int_shape(node.outputs[0], b) if node.outputs else None
    return (0, _prod(out)) if out is not None else (0, 0)


def _no_compute(g: Graph, node: Node, b: dict[str, int] | None) -> tuple[int, int]:
    return 0, 0


def node_macs(graph: Graph, node: Node, bindings: dict[str, int] | None = None) -> tuple[int, int]:
    """(MACs, other element ops) of one node for the shapes in ``graph`` with symbolic dims bound
    by ``bindings`` (unbound ones are 1); (0, 0) where shapes are unknown. Ops without an entry
    count one op per output element."""
    info = op_info(node.op, node.domain)
    fn = info.macs if info is not None and info.macs is not None else _elementwise_ops
    return fn(graph, node, bindings)


# --------------------------------------------------------------------------- weights


def _gemm_out(node: Node, ndim: int) -> int:
    return 0 if node.attrs.get("transB", 0) else 1


def _gemm_in(node: Node, ndim: int) -> int:
    return 1 if node.attrs.get("transB", 0) else 0


def weight_axes(node: Node, ndim: int) -> tuple[int, int | None] | None:
    """(out axis, in axis) of the node's weight of rank ``ndim``, or None for ops without one."""
    info = op_info(node.op, node.domain)
    if info is None or info.weight is None:
        return None
    return info.weight.out_axis(node, ndim), info.weight.in_axis(node, ndim)


def weight_node(graph: Graph, node: Node) -> np.ndarray | None:
    """The node's constant weight if it is a weight op in the table's sense (Conv, ConvTranspose,
    Gemm without transA, MatMul with a constant second input, Gather from a constant table),
    else None."""
    info = op_info(node.op, node.domain)
    if info is None or info.weight is None or len(node.inputs) <= info.weight.index:
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    if node.op == "MatMul" and graph.constant(node.inputs[0]) is not None:
        return None
    if node.op == "Gather":
        table = graph.constant(node.inputs[0])
        ids = node.inputs[1]
        if table is None or table.ndim != 2 or int(node.attrs.get("axis", 0)) != 0 or graph.constant(ids) is not None:
            return None
        if ids.dtype is not None and np.dtype(ids.dtype).kind not in "iu":
            return None
        return table
    return graph.constant(node.inputs[info.weight.index])


def weight_matrix(graph: Graph, node: Node) -> np.ndarray | None:
    """The constant float weight of a Conv (any groups), ConvTranspose-free weight op, Gemm or
    2-D MatMul as an ``(outputs, inputs)`` matrix (a Conv's inputs are in*kh*kw); None if the node
    has no such weight. Batched MatMul weights (rank > 2) and embedding tables are not matrices."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        return None
    w = weight_node(graph, node)
    if w is None or w.dtype.kind != "f":
        return None
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op == "MatMul" and w.ndim != 2:
        return None
    out_axis, _ = weight_axes(node, w.ndim)  # type: ignore[misc]
    return w if out_axis == 0 else w.T


def matrix_to_weight(node: Node, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`weight_matrix`: the ``(outputs, inputs)`` matrix back in the node's layout."""
    if node.op == "Conv":
        return matrix.reshape(shape)
    out_axis, _ = weight_axes(node, len(shape))  # type: ignore[misc]
    return matrix if out_axis == 0 else np.ascontiguousarray(matrix.T)


def out_channels(node: Node, w: np.ndarray) -> int:
    """Output channels of a weight op with weight ``w`` (a grouped ConvTranspose has groups x the
    weight's out axis)."""
    out_axis, _ = weight_axes(node, w.ndim)  # type: ignore[misc]
    groups = int(node.attrs.get("group", 1)) if node.op == "ConvTranspose" else 1
    return w.shape[out_axis] * groups


def scale_out_channels(node: Node, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``c`` multiplied by ``scale[c]`` (the layout knowledge BatchNorm
    folding needs: a grouped ConvTranspose keeps its output channels per group)."""
    out_axis, _ = weight_axes(node, w.ndim)  # type: ignore[misc]
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        wg = w.reshape((g, w.shape[0] // g) + w.shape[1:])
        return (wg * scale.reshape((g, 1, len(scale) // g) + (1,) * (w.ndim - 2))).reshape(w.shape)
    shape = [1] * w.ndim
    shape[out_axis] = len(scale)
    return w * scale.reshape(shape)


#: Elementwise ops whose constant operand is a learned parameter in exported graphs (a bias added
#: after a MatMul, an RMSNorm or LayerScale weight multiplied in).
_AFFINE_TRAINABLE = {"Add": (0, 1), "Mul": (0, 1), "PRelu": (1,)}


def trainable_inputs(node: Node) -> tuple[int, ...]:
    """Input indices of ``node`` whose float constants train (weights, biases, norm scales)."""
    info = op_info(node.op, node.domain)
    if node.op in _AFFINE_TRAINABLE:
        return _AFFINE_TRAINABLE[node.op]
    if info is None or "trainable" not in info.roles:
        return ()
    out: list[int] = []
    if info.weight is not None:
        out.append(info.weight.index)
        if info.weight.bias is not None:
            out.append(info.weight.bias)
    if info.params is not None:
        # BatchNorm trains scale and bias; its running statistics stay frozen.
        out.extend(info.params.indices[:2])
    return tuple(out)


# --------------------------------------------------------------------------- the table

_CONV = WeightSpec(1, lambda n, d: 0, lambda n, d: 1, bias=2, bias_axis=0)
_CONV_T = WeightSpec(1, lambda n, d: 1, lambda n, d: 0, bias=2, bias_axis=0)
_GEMM = WeightSpec(1, _gemm_out, _gemm_in, bias=2)
_MATMUL = WeightSpec(1, lambda n, d: d - 1, lambda n, d: d - 2)
_EMBEDDING = WeightSpec(0, lambda n, d: 1, lambda n, d: None)
_CONTRACTION_ROLES = ("prunable", "quantizable", "trainable", "factorizable", "sparsifiable")

_add("Conv", Rule.WEIGHT, weight=_CONV, macs=_conv_macs, roles=(*_CONTRACTION_ROLES, "bn_foldable"))
_add(
    "ConvTranspose",
    Rule.WEIGHT,
    weight=_CONV_T,
    macs=_conv_transpose_macs,
    roles=("prunable", "trainable", "bn_foldable"),
)
_add("Gemm", Rule.WEIGHT, weight=_GEMM, macs=_gemm_macs, roles=(*_CONTRACTION_ROLES, "bn_foldable"))
_add("MatMul", Rule.MATMUL, weight=_MATMUL, macs=_matmul_macs, roles=_CONTRACTION_ROLES)
_add("Gather", Rule.GATHER, weight=_EMBEDDING, macs=_no_compute, roles=("prunable", "quantizable", "trainable"))
# Quantized forms: counted, never rewritten.
for _op in ("ConvInteger", "QLinearConv"):
    _add(_op, Rule.WEIGHT, macs=_conv_macs, roles=("quantized",))
for _op in ("MatMulInteger", "QLinearMatMul"):
    _add(_op, Rule.WEIGHT, macs=_matmul_macs, roles=("quantized",))

_add("BatchNormalization", Rule.NORM, params=ParamSpec((1, 2, 3, 4)), roles=("trainable",))
_add("InstanceNormalization", Rule.NORM, params=ParamSpec((1, 2)), roles=("trainable",))
_add("LayerNormalization", Rule.LAYER_NORM, params=ParamSpec((1, 2), axis=None), roles=("trainable",))
_add("PRelu", Rule.ELEMENTWISE, roles=("trainable",))

for _op in (
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
    "Shrink",
    "Not",
):
    _add(_op, Rule.SAME)
for _op in ("Identity", "Cast", "Dropout"):
    _add(_op, Rule.SAME, macs=_no_compute)
for _op in ("MaxPool", "AveragePool", "LpPool"):
    _add(_op, Rule.SAME, macs=_pool_macs)
for _op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
    _add(_op, Rule.SAME, macs=_global_pool_macs)
for _op in (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Pow",
    "Where",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
):
    _add(_op, Rule.ELEMENTWISE)
_add("Clip", Rule.CLIP)
_add("LRN", Rule.MIXES)
for _op in (
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL1",
    "ReduceL2",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceLogSumExp",
):
    _add(_op, Rule.REDUCE)
for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    _add(_op, Rule.SOFTMAX)
_add("Concat", Rule.CONCAT, macs=_no_compute)
_add("Split", Rule.SPLIT, macs=_no_compute)
_add("Reshape", Rule.RESHAPE, macs=_no_compute)
_add("Flatten", Rule.RESHAPE, macs=_no_compute)
_add("Squeeze", Rule.SQUEEZE, macs=_no_compute)
_add("Unsqueeze", Rule.SQUEEZE, macs=_no_compute)
_add("Transpose", Rule.TRANSPOSE, macs=_no_compute)
_add("Slice", Rule.SLICE, macs=_no_compute)
_add("Pad", Rule.PAD, macs=_no_compute)
_add("Resize", Rule.RESIZE)
_add("Upsample", Rule.RESIZE)
_add("Expand", Rule.EXPAND, macs=_no_compute)
for _op in (
    "Shape",
    "Size",
    "ConstantOfShape",
    "Range",
    "Constant",
    "EyeLike",
    "RandomNormalLike",
    "RandomUniformLike",
):
    _add(_op, Rule.SHAPE, macs=_no_compute)
for _op in (
    "GatherElements",
    "GatherND",
    "ScatterND",
    "ScatterElements",
    "Tile",
    "ArgMax",
    "ArgMin",
    "CumSum",
    "Trilu",
    "OneHot",
    "TopK",
    "NonZero",
):
    _add(_op, Rule.OPAQUE, macs=_no_compute)
for _op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
    _add(_op, Rule.SAME, macs=_no_compute)
