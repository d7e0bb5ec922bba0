"""prune-channels: structured channel pruning with dependency groups; channels are physically removed.

Groups of coupled channels come from the channel analysis (residual Add, Concat, grouped and
depthwise Conv, channel shuffles, Flatten/Reshape into Gemm, MatMul chains, the FFN inner
dimension of a transformer with Gelu written out or as one op, SwiGLU's gate and up projections
together). Each prunable group loses channels by importance (``criterion``): ``l1`` / ``l2`` norms
of the weights of every member, summed after normalization; ``bn-gamma`` (Network Slimming) the
|gamma| of the BatchNormalizations on the group (run it before fold-batchnorm; groups without one
fall back to l1); ``activation`` (data-driven, Wanda style: input activation norm on ``--data``
times the weights that read it); ``random`` (seeded).

``scope=local`` removes ``ratio`` of each group; ``scope=global`` ranks all channels on one scale.
``layer_ratios=["conv2=0.3","fc1=0.5"]`` sets the ratio of single groups (scope=local): a group is
named by any of its producer node names (``inspect --groups`` lists them), groups not named
prune at ``ratio``, a name that matches no group is reported as skipped; this is what
``graphslim search`` writes into its recipes.
``target_macs`` / ``target_params`` (fraction of the current model to keep) search the global
ratio that meets the target. ``round_to`` keeps channel counts at multiples of N, and every group
keeps at least ``min_channels``.

Constant subexpressions (a BatchNorm scale reaching a Mul through an Unsqueeze of an initializer)
are folded first, so what ran before does not matter.

Refuses (leaves unpruned, with the reason in the report): groups that reach a graph output,
groups touching an op the analysis does not understand (LRN, Softmax over channels, a Split
through a channel set...), groups whose producer is in ``exclude``, attention heads (prune-heads
takes them) and the hidden dimension of a transformer (prune-hidden). Input and output shapes of
the model never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphslim.analysis.channels import channel_groups
from graphslim.analysis.cost import cost_model
from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, parse_layer_values, register_pass
from graphslim.transforms.pruning import PruneRequest, prune


@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    exact = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        criterion: Literal["l1", "l2", "bn-gamma", "activation", "random"] = "l1"
        scope: Literal["local", "global"] = "local"
        round_to: int = 1
        min_channels: int = 1
        exclude: tuple[str, ...] = ()
        target_macs: float | None = None
        target_params: float | None = None
        layer_ratios: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_prune_options(
                self.ratio,
                self.round_to,
                self.min_channels,
                self.target_macs,
                self.target_params,
                layer_ratios=self.layer_ratios,
                scope=self.scope,
            )

    kinds = frozenset({"channels"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return run_prune(self, graph, ctx, self.kinds)


def check_prune_options(
    ratio: float,
    round_to: int,
    min_channels: int,
    target_macs: float | None,
    target_params: float | None,
    *,
    layer_ratios: tuple[str, ...] = (),
    scope: str = "local",
) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError("ratio must be in [0, 1)")
    parse_layer_values("layer_ratios", layer_ratios, low=0.0, high=1.0)
    if layer_ratios and (scope != "local" or target_macs is not None or target_params is not None):
        raise ValueError("layer_ratios sets per-group ratios: it needs scope=local and no target_macs/target_params")
    if round_to < 1 or min_channels < 1:
        raise ValueError("round_to and min_channels must be >= 1")
    if target_macs is not None and target_params is not None:
        raise ValueError("give target_macs or target_params, not both")
    for t in (target_macs, target_params):
        if t is not None and not 0.0 < t <= 1.0:
            raise ValueError("targets are fractions of the model to keep, in (0, 1]")


def run_prune(
    p: Pass, graph: Graph, ctx: PassContext, kinds: frozenset[str], unit_name: str = "channels"
) -> PassResult:
    """The body the pruning passes share: fold constant subexpressions, analyze, prune."""
    o = p.options
    folded = graph.fold_constant_subexpressions()
    an = ctx.analysis(channel_groups, graph)
    base = ctx.analysis(cost_model, graph)
    req = PruneRequest(
        kinds=kinds,
        ratio=o.ratio,
        criterion=o.criterion,
        scope=o.scope,
        round_to=o.round_to,
        min_channels=o.min_channels,
        exclude=tuple(o.exclude),
        target_macs=o.target_macs,
        target_params=o.target_params,
        unit_name=unit_name,
        layer_ratios=tuple(
            parse_layer_values("layer_ratios", getattr(o, "layer_ratios", ()), low=0.0, high=1.0).items()
        ),
    )
    if req.criterion == "activation" and ctx.data is None:
        raise ValueError(f"{p.name}{{criterion=activation}} ranks by activations: give --data")
    removed, stats, skipped = prune(graph, an, req, data=ctx.data, rng=ctx.rng(p.name), base=(base.params, base.macs))
    if folded:
        stats["constants_folded"] = folded
    return PassResult(changed=removed > 0 or folded > 0, stats=stats, skipped=[Skip(w, r) for w, r in skipped])
