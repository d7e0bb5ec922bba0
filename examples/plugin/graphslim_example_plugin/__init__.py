"""round-weights: an example third-party pass, registered through the ``graphslim.passes``
entry-point group (see pyproject.toml). It rounds float weights to ``decimals`` places, a lossy
rewrite small enough to read in one sitting.

    pip install ./examples/plugin
    graphslim optimize model.onnx -o out/ --passes "round-weights{decimals=2}"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim import Pass, PassResult


class RoundWeights(Pass):
    name = "round-weights"
    exact = False

    @dataclass(frozen=True)
    class Options:
        decimals: int = 3

    def run(self, graph, ctx) -> PassResult:
        changed = 0
        for node in graph.nodes:
            if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            w = graph.constant(node.inputs[1])
            if w is None or w.dtype.kind != "f":
                continue
            rounded = np.round(w, self.options.decimals).astype(w.dtype)
            if not np.array_equal(rounded, w):
                graph.set_constant(node, 1, rounded)
                changed += 1
        return PassResult(changed=changed > 0, stats={"layers_rounded": changed})
