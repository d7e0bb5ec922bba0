"""eliminate-dead-nodes: drop nodes and initializers that no graph output depends on."""

from __future__ import annotations

from dataclasses import dataclass

from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadNodes(Pass):
    name = "eliminate-dead-nodes"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = graph.cleanup()
        return PassResult(changed=removed > 0, stats={"nodes_removed": removed})
