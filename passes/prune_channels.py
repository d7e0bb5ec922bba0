"""prune-channels: structured channel pruning with dependency groups; channels are physically removed.

Groups of coupled channels come from the channel analysis (residual Add, Concat, grouped and
depthwise Conv, Flatten/Reshape into Gemm, MatMul chains). Each prunable group loses channels
by importance (``criterion``): ``l1`` / ``l2`` norms of the weights of every member, summed after
normalization; ``bn-gamma`` (Network Slimming) the |gamma| of the BatchNormalizations on the group
(run it before fold-batchnorm; groups without one fall back to l1); ``random`` (seeded).

``scope=local`` removes ``ratio`` of each group; ``scope=global`` ranks all channels on one scale.
``target_macs`` / ``target_params`` (fraction of the current model to keep) search the global
ratio that meets the target. ``round_to`` keeps channel counts at multiples of N, and every group
keeps at least ``min_channels``.

Refuses (leaves unpruned, with the reason in the report): groups that reach a graph output or a
graph input, groups touching an op the analysis does not understand (channel shuffle, LRN, Softmax
over channels, Split through a channel set...), and groups whose producer is in ``exclude``.
Input and output shapes of the model never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphslim.analysis.channels import ChannelAnalysis, Group, channel_groups
from graphslim.analysis.cost import cost_model
from graphslim.core.ir import Graph
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass
from graphslim.transforms.pruning import (
    Rounding,
    apply_pruning,
    estimate_cost,
    group_scores,
    keep_counts,
    select_channels,
)


@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    exact = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        criterion: Literal["l1", "l2", "bn-gamma", "random"] = "l1"
        scope: Literal["local", "global"] = "local"
        round_to: int = 1
        min_channels: int = 1
        exclude: tuple[str, ...] = ()
        target_macs: float | None = None
        target_params: float | None = None

        def __post_init__(self) -> None:
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError("ratio must be in [0, 1)")
            if self.round_to < 1 or self.min_channels < 1:
                raise ValueError("round_to and min_channels must be >= 1")
            if self.target_macs is not None and self.target_params is not None:
                raise ValueError("give target_macs or target_params, not both")
            for t in (self.target_macs, self.target_params):
                if t is not None and not 0.0 < t <= 1.0:
                    raise ValueError("targets are fractions of the model to keep, in (0, 1]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        an: ChannelAnalysis = ctx.analysis(channel_groups, graph)
        skipped: list[Skip] = []
        groups: list[Group] = []
        excluded = set(o.exclude)
        for g in an.groups:
            names = [an.roots[r].origin for r in g.roots]
            if g.size <= 1:
                continue
            if g.frozen:
                reasons = sorted(set(g.frozen))
                skipped.append(Skip(f"group {g.id} ({', '.join(names[:4])})", "; ".join(reasons[:3])))
            elif excluded & set(names):
                skipped.append(Skip(f"group {g.id} ({', '.join(names[:4])})", "excluded by the exclude option"))
            else:
                groups.append(g)
        rounding = Rounding(o.round_to, o.min_channels)
        scores, fallbacks = group_scores(graph, an, groups, o.criterion, ctx.rng(self.name))
        stats: dict = {"groups": len(an.groups), "prunable_groups": len(groups), "criterion": o.criterion}
        if fallbacks:
            stats["criterion_fallbacks_to_l1"] = fallbacks
        if o.target_macs is not None or o.target_params is not None:
            ratio, reached = self._search(graph, ctx, an, groups, scores, rounding)
            stats["searched_ratio"] = round(ratio, 6)
            stats["target_reached"] = reached
            if not reached:
                skipped.append(Skip("model", "the target cannot be met: every prunable group is at its minimum"))
            counts = keep_counts(groups, scores, ratio, "global", rounding)
        else:
            counts = keep_counts(groups, scores, o.ratio, o.scope, rounding)
        kept = {g.id: select_channels(g, scores[g.id], counts[g.id]) for g in groups}
        before = sum(g.size for g in groups)
        after = sum(len(kept[g.id]) for g in groups)
        removed = apply_pruning(graph, an, kept) if after < before else 0
        stats.update(
            {
                "channels_before": before,
                "channels_after": after,
                "channels_removed": before - after,
                "pruned_groups": [
                    {
                        "group": g.id,
                        "members": [an.roots[r].origin for r in g.roots],
                        "channels": [g.size, len(kept[g.id])],
                    }
                    for g in groups
                    if len(kept[g.id]) < g.size
                ],
            }
        )
        return PassResult(changed=removed > 0, stats=stats, skipped=skipped)

    def _search(
        self, graph: Graph, ctx: PassContext, an: ChannelAnalysis, groups: list[Group], scores, rounding: Rounding
    ) -> tuple[float, bool]:
        """Smallest global ratio whose pruned model meets the target (bisection on exact estimates)."""
        base = ctx.analysis(cost_model, graph)
        use_macs = self.options.target_macs is not None
        target = self.options.target_macs if use_macs else self.options.target_params
        goal = target * (base.macs if use_macs else base.params)

        def meets(ratio: float) -> bool:
            params, macs = estimate_cost(
                graph, an, keep_counts(groups, scores, ratio, "global", rounding), (base.params, base.macs)
            )
            return (macs if use_macs else params) <= goal

        hi = 0.999
        if not meets(hi):
            return hi, False
        lo = 0.0
        if meets(lo):
            return lo, True
        for _ in range(40):
            mid = (lo + hi) / 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
        return hi, True
