"""prune-hidden: prune the hidden (residual-stream) dimension of a transformer, across all layers.

The hidden dimension is one group: the embeddings (Gather tables), every residual Add, the
LayerNormalization / RMSNorm scales and biases, the input columns of every Q/K/V, FFN and output
head projection and the output rows of every attention output and FFN down projection. It is off
by default because it is approximate: a LayerNorm or RMSNorm over the hidden dimension computes
its mean and variance over the kept channels only, so even channels whose weights are all zero
change the normalized values (by a factor of about sqrt(kept / all) for RMSNorm and a shifted
mean for LayerNorm); tests bound that error, and distillation afterwards recovers most of it.

Models whose output is the hidden state itself (an encoder returning ``last_hidden_state``) keep
it: the group reaches a graph output, whose shape never changes. Decoders with an LM head and
classifiers with a head are where it applies. Options as prune-channels (``ratio`` of the hidden
channels, ``criterion=auto``: activations with ``--data``, else L2 norms, ``round_to`` for
hardware-friendly widths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphslim.passes.prune_channels import check_prune_options, run_prune

from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
class PruneHidden(Pass):
    name = "prune-hidden"
    exact = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.25
        criterion: Literal["auto", "l1", "l2", "activation", "random"] = "auto"
        round_to: int = 1
        min_channels: int = 1
        exclude: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_prune_options(self.ratio, self.round_to, self.min_channels, None, None)

        scope = "local"
        target_macs = None
        target_params = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return run_prune(self, graph, ctx, frozenset({"hidden"}))
