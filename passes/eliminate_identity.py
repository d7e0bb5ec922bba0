"""eliminate-identity: remove Identity nodes, inference-mode Dropout, and Cast to the type its
input already has (Hugging Face exports write ``softmax(...).to(query.dtype)`` as a float32 ->
float32 Cast between attention's softmax and its second matmul).

Refuses a Dropout whose mask output is read, or whose ``training_mode`` input is not a constant
false, and an Identity that connects a graph input straight to a graph output (removing it would
rename an output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass


@register_pass
class EliminateIdentity(Pass):
    name = "eliminate-identity"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        skipped: list[Skip] = []
        for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout") or _same_type_cast(n)]:
            reason = self._why_not(graph, node)
            if reason is None:
                reason = graph.bypass(node)
            if reason is None:
                removed += 1
            else:
                skipped.append(Skip(node.name, reason))
        return PassResult(changed=removed > 0, stats={"nodes_removed": removed}, skipped=skipped)

    @staticmethod
    def _why_not(graph: Graph, node) -> str | None:
        if node.op != "Dropout":
            return None
        if len(node.outputs) > 1 and (graph.consumers(node.outputs[1]) or graph.is_graph_output(node.outputs[1])):
            return "its mask output is used"
        if len(node.inputs) > 2 and node.inputs[2].name:
            mode = graph.constant(node.inputs[2])
            if mode is None or bool(mode.reshape(-1)[0]):
                return "training_mode is not a constant false"
        return None


def _same_type_cast(node) -> bool:
    """A Cast whose input's element type is known and already the one it casts to."""
    if node.op != "Cast" or not node.inputs or node.inputs[0].dtype is None or "to" not in node.attrs:
        return False
    try:
        to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        return np.dtype(node.inputs[0].dtype) == to
    except (TypeError, ValueError, KeyError):
        return False
