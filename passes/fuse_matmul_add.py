"""fuse-matmul-add: MatMul(A, constant B) followed by Add(constant bias) becomes one Gemm.

Only where Gemm's contract holds: A is 2-D, B is a 2-D constant, the bias broadcasts to the
output (a scalar, ``[N]``, ``[1, N]`` or ``[M, N]``), and nothing else reads the MatMul output.
A MatMul on a 3-D input (transformer style) is left alone: Gemm takes 2-D inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.core.ir import Graph, Node
from graphslim.core.patterns import only_consumer
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass


@register_pass
class FuseMatMulAdd(Pass):
    name = "fuse-matmul-add"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused = 0
        skipped: list[Skip] = []
        for mm in [n for n in graph.nodes if n.op == "MatMul"]:
            add = only_consumer(graph, mm.outputs[0])
            if add is None or add.op != "Add":
                continue
            other = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
            bias = graph.constant(other)
            weight = graph.constant(mm.inputs[1])
            if bias is None or weight is None:
                continue
            why = self._why_not(graph, mm, weight, bias)
            if why is not None:
                skipped.append(Skip(mm.name, why))
                continue
            self._rewrite(graph, mm, add, other)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused}, skipped=skipped)

    @staticmethod
    def _why_not(graph: Graph, mm: Node, weight: np.ndarray, bias: np.ndarray) -> str | None:
        if weight.ndim != 2:
            return f"the weight has rank {weight.ndim}; Gemm needs rank 2"
        if graph.rank(mm.inputs[0]) != 2:
            return f"the input has rank {graph.rank(mm.inputs[0])}; Gemm takes 2-D inputs"
        n = weight.shape[1]
        out = graph.shape(mm.outputs[0])
        m = out[0] if out else None
        ok = (
            bias.ndim <= 1
            and bias.size in (1, n)
            or bias.ndim == 2
            and bias.shape[1] in (1, n)
            and (bias.shape[0] == 1 or bias.shape[0] == m)
        )
        if not ok:
            return f"the bias of shape {list(bias.shape)} does not broadcast to [M, {n}]"
        if bias.dtype != weight.dtype:
            return "bias and weight have different dtypes"
        return None

    @staticmethod
    def _rewrite(graph: Graph, mm: Node, add: Node, bias) -> None:
        a, b, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
        graph.remove_nodes([mm, add])
        graph.add_node("Gemm", [a, b, bias], [out], name=f"{mm.name}_gemm" if mm.name else "Gemm")
