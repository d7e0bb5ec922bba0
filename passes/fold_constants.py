"""fold-constants: evaluate every subgraph whose inputs are all constants.

Uses onnx-graphsurgeon's folder (which runs ONNX Runtime on the constant part, and also folds
shape computations where shapes are static) rather than a hand-written evaluator. Results larger
than ``max_mib`` MiB are left unfolded, so folding never blows up the model size (an Expand or
Tile of a small constant stays as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"

    @dataclass(frozen=True)
    class Options:
        max_mib: float = 16.0

        def __post_init__(self) -> None:
            if self.max_mib <= 0:
                raise ValueError("max_mib must be > 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.fold_constants(size_threshold=int(self.options.max_mib * 2**20))
        graph.cleanup()
        folded = before - len(graph.nodes)
        return PassResult(changed=folded > 0, stats={"nodes_folded": folded})
