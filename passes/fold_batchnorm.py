"""fold-batchnorm: fold inference BatchNormalization (and per-channel Mul/Div/Add/Sub by constants)
into the weights and bias of the Conv, ConvTranspose or Gemm that feeds it.

Pattern: a producer with constant weights whose output is read only by the folded node. Exact up
to float rounding. Refused, with the reason in the report: a BatchNormalization in training mode
or whose statistics are not constants, one fed by anything else (a graph input, a MatMul, a
shared tensor), and a scale or shift that does not broadcast per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.core.ir import Graph, Node
from graphslim.core.ops import out_channels, scale_out_channels
from graphslim.core.patterns import channel_vector, only_consumer, weight_producer
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass

_AFFINE = ("Mul", "Div", "Add", "Sub")


def _current_bias(graph: Graph, prod: Node, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """The producer's effective bias as a per-channel vector (zeros if absent), or None if its
    bias does not broadcast per channel (a full-matrix Gemm C)."""
    if len(prod.inputs) < 3 or not prod.inputs[2].name:
        return np.zeros(channels, dtype=dtype)
    b = graph.constant(prod.inputs[2])
    if b is None:
        return None
    if prod.op == "Gemm":
        b = b * np.asarray(prod.attrs.get("beta", 1.0), dtype=b.dtype)
        vec = channel_vector(b, 2, 1, channels)
        return vec
    return b.reshape(channels)


def _apply(graph: Graph, prod: Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """y' = y * scale + shift, folded into the producer's weight and bias."""
    w = graph.constant(prod.inputs[1])
    c = len(scale)
    w2 = scale_out_channels(prod, w, scale)
    bias = _current_bias(graph, prod, c, w.dtype)
    new_bias = (bias * scale + shift).astype(w.dtype)
    graph.set_constant(prod, 1, w2.astype(w.dtype))
    if len(prod.inputs) >= 3 and prod.inputs[2].name:
        graph.set_constant(prod, 2, new_bias)
    else:
        graph.set_input(prod, 2, graph.make_constant(new_bias, f"{prod.name}_bias"))
    if prod.op == "Gemm":
        graph.set_attr(prod, "beta", 1.0)


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"

    @dataclass(frozen=True)
    class Options:
        affine: bool = True  # also fold per-channel Mul/Div/Add/Sub by constants

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded_bn = folded_affine = 0
        # A scale reaching its Mul through an Unsqueeze of an initializer is a constant too.
        folded_const = graph.fold_constant_subexpressions()
        reasons: dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for node in list(graph.nodes):
                if node.op == "BatchNormalization":
                    why = self._fold_bn(graph, node)
                    if why is None:
                        folded_bn += 1
                        changed = True
                        reasons.pop(node.name, None)
                    else:
                        reasons[node.name] = why
                elif self.options.affine and node.op in _AFFINE and self._fold_affine(graph, node):
                    folded_affine += 1
                    changed = True
        skipped = [Skip(name, why) for name, why in reasons.items()]
        return PassResult(
            changed=bool(folded_bn or folded_affine or folded_const),
            stats={
                "batchnorm_folded": folded_bn,
                "affine_folded": folded_affine,
                "batchnorm_left": len(skipped),
                "constants_folded": folded_const,
            },
            skipped=skipped,
        )

    @staticmethod
    def _fold_bn(graph: Graph, bn: Node) -> str | None:
        if bn.attrs.get("training_mode", 0):
            return "training_mode=1"
        if any(graph.consumers(o) or graph.is_graph_output(o) for o in bn.outputs[1:]):
            return "its running-statistics outputs are used"
        params = [graph.constant(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "scale, bias, mean or variance is not a constant"
        prod = weight_producer(graph, bn.inputs[0], "bn_foldable")
        if prod is None:
            return "not fed by a Conv, ConvTranspose or Gemm with constant weights"
        if only_consumer(graph, bn.inputs[0]) is not bn:
            return "the producer's output has other readers"
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        c = out_channels(prod, graph.constant(prod.inputs[1]))
        if gamma.size != c:
            return f"{gamma.size} BatchNorm channels but the producer has {c} output channels"
        w = graph.constant(prod.inputs[1])
        if _current_bias(graph, prod, c, w.dtype) is None:
            return "the producer's bias is not per-channel"
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        _apply(graph, prod, scale.astype(w.dtype), shift.astype(w.dtype))
        graph.bypass(bn)
        return None

    @staticmethod
    def _fold_affine(graph: Graph, node: Node) -> bool:
        x, k = node.inputs[0], node.inputs[1]
        kval = graph.constant(k)
        if kval is None or graph.constant(x) is not None:
            return False
        prod = weight_producer(graph, x, "bn_foldable")
        if prod is None or only_consumer(graph, x) is not node:
            return False
        rank = graph.rank(x)
        w = graph.constant(prod.inputs[1])
        if rank is None or kval.dtype != w.dtype:
            return False
        c = out_channels(prod, graph.constant(prod.inputs[1]))
        vec = channel_vector(kval, rank, 1, c)
        if vec is None or _current_bias(graph, prod, c, w.dtype) is None:
            return False
        vec = vec.astype(np.float64)
        if node.op in ("Mul", "Div"):
            if node.op == "Div" and np.any(vec == 0):
                return False
            scale = vec if node.op == "Mul" else 1.0 / vec
            shift = np.zeros(c)
        else:
            scale = np.ones(c)
            shift = vec if node.op == "Add" else -vec
        _apply(graph, prod, scale.astype(w.dtype), shift.astype(w.dtype))
        graph.bypass(node)
        return True
