"""prune-heads: remove whole attention heads (Q, K and V projections, the output projection's
input rows) from decomposed attention.

The channel analysis follows the Q, K and V projections through the Reshape to
``[B, S, heads, head_dim]`` (computed from Shape/Gather/Concat, as exports write it), the
Transposes, RoPE (rotate-half slices and the cos/sin products), the QK^T and scores x V MatMuls
and back through the Transpose/Reshape into the output projection; a head is one unit across all
of them. Under grouped-query attention a key/value head prunes together with the group of query
heads that share it. Head dimension does not change (RoPE tables stay as they are); Reshape
targets written as -1 or computed at run time follow the pruned tensors, constant ones are
rewritten. Works on what ``torch.onnx.export`` writes for BERT-family, ViT, GPT-2-style (fused QKV
Gemm + Split) and Llama-style (RMSNorm, SwiGLU, RoPE, GQA) models.

``ratio`` of the heads go in every attention layer (``scope=local``) or over all layers on one
scale (``global``); ``criterion=auto`` ranks heads by activations on ``--data`` when given (the
context vectors' norm times the output projection's weights), else by the L2 norm of their
weights. Every layer keeps at least ``min_heads``. ``layer_ratios=["NAME=0.5", ...]`` sets the ratio of
single attention layers (scope=local), each named by any of its Q, K or V projection node names;
layers not named prune at ``ratio``.

Leaves alone, with the reason: fused attention ops (``Attention``, ``MultiHeadAttention``,
``GroupQueryAttention``: their heads are inside one node), and attention whose heads reach a graph
output or an op the analysis does not follow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from graphslim.passes.prune_channels import check_prune_options, run_prune

from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass

_FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention")


@register_pass
class PruneHeads(Pass):
    name = "prune-heads"
    exact = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        criterion: Literal["auto", "l1", "l2", "activation", "random"] = "auto"
        scope: Literal["local", "global"] = "local"
        min_heads: int = 1
        exclude: tuple[str, ...] = ()
        target_macs: float | None = None
        target_params: float | None = None
        layer_ratios: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_prune_options(
                self.ratio,
                1,
                self.min_heads,
                self.target_macs,
                self.target_params,
                layer_ratios=self.layer_ratios,
                scope=self.scope,
            )

        @property
        def round_to(self) -> int:
            return 1

        @property
        def min_channels(self) -> int:
            return self.min_heads

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = run_prune(self, graph, ctx, frozenset({"heads"}), unit_name="heads")
        fused = [
            Skip(n.name or n.op, f"fused {n.op} op: its heads are inside one node, which pruning does not open")
            for n in graph.nodes
            if n.op in _FUSED
        ]
        if fused:
            result = replace(result, skipped=[*fused, *result.skipped])
        return result
