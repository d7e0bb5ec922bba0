"""sparsify-blocks: magnitude pruning of weight blocks to a target block sparsity.

Each Gemm, MatMul (2-D constant weight) and Conv weight is seen as an ``(outputs, inputs)``
matrix (a Conv's inputs are in*kh*kw) and tiled into ``block`` = [rows, cols] blocks ([1,4], [4,4]
or [16,1] are what the backend's block-sparse kernels use). The blocks with the smallest L2 norm
are set to exact zeros: ``sparsity`` of the blocks of each layer (``scope=layer``), or of all
blocks of all selected layers on one scale (``scope=global``). ``layer_sparsity=["fc1=0.9", ...]``
gives single layers (by node name) their own block sparsity (scope=layer); the others take
``sparsity`` (``sparsity=0`` leaves them dense, as ``graphslim search`` writes it). Weights keep
their dense shape, so the model runs anywhere; the zeros are what a sparse backend exploits.

Leaves alone, with the reason in the report: non-float or non-constant weights, batched MatMul
weights, layers named in ``exclude``, and layers smaller than one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphslim.analysis.sparsity import block_norms, block_sparsity, expand_block_mask
from graphslim.core.ir import Graph, Node
from graphslim.core.ops import matrix_to_weight, weight_matrix
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, parse_layer_values, register_pass


@register_pass
class SparsifyBlocks(Pass):
    name = "sparsify-blocks"
    exact = False

    @dataclass(frozen=True)
    class Options:
        sparsity: float = 0.8
        block: tuple[int, ...] = (1, 4)
        ops: tuple[str, ...] = ("Gemm", "MatMul", "Conv")
        exclude: tuple[str, ...] = ()
        scope: Literal["layer", "global"] = "layer"
        layer_sparsity: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError("sparsity must be in [0, 1)")
            parse_layer_values("layer_sparsity", self.layer_sparsity, low=0.0, high=1.0)
            if self.layer_sparsity and self.scope != "layer":
                raise ValueError("layer_sparsity sets per-layer sparsity: it needs scope=layer")
            if len(self.block) != 2 or min(self.block) < 1:
                raise ValueError("block must be [rows, cols] with both >= 1")
            bad = set(self.ops) - {"Gemm", "MatMul", "Conv"}
            if bad:
                raise ValueError(f"ops can be Gemm, MatMul, Conv (not {', '.join(sorted(bad))})")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        block = (int(o.block[0]), int(o.block[1]))
        per_layer = parse_layer_values("layer_sparsity", o.layer_sparsity, low=0.0, high=1.0)
        skipped: list[Skip] = []
        layers = []
        seen: set[str] = set()
        for node in graph.nodes:
            if node.op not in o.ops:
                continue
            if node.name in o.exclude:
                skipped.append(Skip(node.name, "excluded by the exclude option"))
                continue
            seen.add(node.name)
            if per_layer.get(node.name, o.sparsity) <= 0.0:
                continue
            m = weight_matrix(graph, node)
            if m is None:
                skipped.append(Skip(node.name, "weight is not a constant float matrix (or a batched MatMul weight)"))
                continue
            if m.shape[0] < block[0] and m.shape[1] < block[1]:
                skipped.append(
                    Skip(node.name, f"weight {list(m.shape)} is smaller than one {block[0]}x{block[1]} block")
                )
                continue
            layers.append((node, m, block_norms(m, block)))
        masks = _dead_blocks(layers, o.scope, o.sparsity, per_layer)
        report, zeroed = [], 0
        for (node, m, _), dead in zip(layers, masks, strict=True):
            if not dead.any():
                continue
            keep = ~expand_block_mask(dead, block, m.shape)
            new = np.where(keep, m, np.zeros((), m.dtype))
            w = graph.constant(node.inputs[1])
            graph.set_constant(node, 1, matrix_to_weight(node, new, w.shape).astype(w.dtype))
            zeroed += int(dead.sum())
            report.append(
                {
                    "name": node.name,
                    "op": node.op,
                    "matrix": list(m.shape),
                    "block_sparsity": round(block_sparsity(new, block), 4),
                    "weight_sparsity": round(float(np.mean(new == 0)), 4),
                }
            )
        for name in sorted(set(per_layer) - seen):
            skipped.append(Skip(name, f"layer_sparsity names no {'/'.join(o.ops)} node"))
        stats = {"block": list(block), "layers": report, "blocks_zeroed": zeroed, "layers_sparsified": len(report)}
        return PassResult(changed=zeroed > 0, stats=stats, skipped=skipped)


def _dead_blocks(
    layers: list[tuple[Node, np.ndarray, np.ndarray]], scope: str, sparsity: float, per_layer: dict[str, float]
) -> list[np.ndarray]:
    """Per layer, which blocks to zero: the lowest-norm ``sparsity`` share of all blocks together
    (``scope=global``) or of each layer's own (its ``per_layer`` share where given)."""
    if scope == "global" and layers:
        everything = np.concatenate([n.reshape(-1) for _, _, n in layers])
        k = int(np.floor(sparsity * everything.size))
        threshold_rank = np.argsort(everything, kind="stable")[:k]
        dead = np.zeros(everything.size, dtype=bool)
        dead[threshold_rank] = True
        masks, pos = [], 0
        for _, _, norms in layers:
            masks.append(dead[pos : pos + norms.size].reshape(norms.shape))
            pos += norms.size
    else:
        masks = []
        for node, _, norms in layers:
            flat = norms.reshape(-1)
            dead = np.zeros(flat.size, dtype=bool)
            share = per_layer.get(node.name, sparsity)
            dead[np.argsort(flat, kind="stable")[: int(np.floor(share * flat.size))]] = True
            masks.append(dead.reshape(norms.shape))
    return masks
