"""spiral: compress a little, distill, repeat, until a size target is met or the accuracy budget
would be broken.

Each step runs ``passes`` (a pipeline, e.g. ``prune-channels{ratio=0.2}`` for CNNs, or
``prune-heads{ratio=0.1},prune-channels{ratio=0.1}`` for transformers) then ``distill`` (a
pipeline, usually one distill pass; empty for none), and measures the model's metric
(:mod:`graphslim.core.metrics`: top-1 accuracy with labels, agreement with the teacher for
logits, mask-pooled cosine to the teacher for hidden states...) on a seeded ``eval_fraction``
held out of the training data. The teacher is the model as it was before the whole pipeline. It
stops when parameters (or MACs) fall to ``target_params`` (``target_macs``) of the original,
after ``steps`` steps, when a step compresses nothing more, or when a step loses more than
``max_drop`` points of the metric against the teacher; that step is rolled back, so the result is
the last model within budget. The report's ``curve`` has r and the metric for every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphslim.analysis.cost import cost_model
from graphslim.core.data import Dataset
from graphslim.core.errors import InputError
from graphslim.core.ir import Graph
from graphslim.core.metrics import Evaluator
from graphslim.pipeline import Pass, PassContext, PassManager, PassRecord, PassResult, Pipeline, Skip, register_pass


@register_pass
class Spiral(Pass):
    name = "spiral"
    exact = False

    @dataclass(frozen=True)
    class Options:
        steps: int = 5
        passes: str = "prune-channels{ratio=0.2}"
        distill: str = "distill{epochs=2}"
        target_params: float | None = 0.1
        target_macs: float | None = None
        max_drop: float = 1.0
        eval_fraction: float = 0.2

        def __post_init__(self) -> None:
            if self.steps < 1:
                raise ValueError("steps must be >= 1")
            if self.max_drop < 0:
                raise ValueError("max_drop must be >= 0")
            for t in (self.target_params, self.target_macs):
                if t is not None and not 0.0 < t <= 1.0:
                    raise ValueError("targets are fractions of the original model, in (0, 1]")
            if not 0.0 < self.eval_fraction < 1.0:
                raise ValueError("eval_fraction must be in (0, 1)")
            if not Pipeline.parse(self.passes).passes:
                raise ValueError("passes must name at least one compression pass")
            Pipeline.parse(self.distill)  # validated now, not at step 3

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if ctx.teacher is None:
            raise InputError("spiral needs the original model as the teacher: run it inside a pipeline")
        if ctx.data is None:
            raise InputError("spiral measures every step on held-out data: give --data (model inputs are enough)")
        _, evalset = ctx.train_eval_split(o.eval_fraction)
        score = _Scorer(ctx, evalset)
        curve = [score.point(0, graph)]
        compress, distill = Pipeline.parse(o.passes), Pipeline.parse(o.distill)
        stop, skipped = "steps exhausted", []
        for step in range(1, o.steps + 1):
            if self._target_met(curve[-1]):
                stop = "target reached"
                break
            snapshot = graph.copy()
            records = PassManager(compress).run(graph, ctx)
            if not any(r.changed for r in records):
                stop = "the compression passes changed nothing"
                why = "; ".join(f"{r.text}: {r.not_run}" for r in records if r.not_run)
                if step == 1:
                    return PassResult(
                        changed=False,
                        stats={"metric": score.metric_name, "curve": curve, "stopped": stop},
                        skipped=skipped,
                        not_run=f"the compression passes changed nothing{': ' + why if why else ''}",
                    )
                break
            if distill.passes:
                inner = PassManager(distill).run(graph, ctx)
                failed = next((r for r in inner if r.not_run), None)
                if failed is not None:  # a distill that cannot run here cannot in later steps either
                    graph.assign(snapshot)
                    return PassResult(
                        changed=False,
                        stats={"metric": score.metric_name, "curve": curve, "stopped": "distillation cannot run"},
                        skipped=skipped,
                        not_run=f"{failed.text}: {failed.not_run}",
                    )
                records += inner
            _merge_skips(records, skipped)
            p = score.point(step, graph)
            if p["drop_points"] > o.max_drop:
                p["rolled_back"] = True
                curve.append(p)
                graph.assign(snapshot)
                stop = f"step {step} lost {p['drop_points']:.2f} points, more than max_drop={o.max_drop}"
                skipped.append(Skip(f"step {step}", f"rolled back: {stop}"))
                break
            curve.append(p)
        else:
            if self._target_met(curve[-1]):
                stop = "target reached"
        return self._result(score, curve, stop, skipped)

    def _result(self, score: _Scorer, curve: list[dict], stop: str, skipped: list[Skip]) -> PassResult:
        """The result of a finished run: the last point within budget is the model kept."""
        kept = [p for p in curve if not p.get("rolled_back")][-1]
        stats = {
            "metric": score.metric_name,
            "metric_description": score.ev.spec.describe(),
            "teacher": round(score.base, 6),
            "curve": curve,
            "stopped": stop,
            "final_r_params": kept["r_params"],
            "final_drop_points": kept["drop_points"],
            "target_reached": self._target_met(kept),
        }
        return PassResult(changed=kept["step"] > 0, stats=stats, skipped=skipped)

    def _target_met(self, p: dict) -> bool:
        o = self.options
        if o.target_macs is not None and (p["r_macs"] is None or p["r_macs"] > o.target_macs):
            return False
        if o.target_params is not None and p["r_params"] > o.target_params:
            return False
        return o.target_params is not None or o.target_macs is not None


class _Scorer:
    """Scores a model against the teacher on the held-out data and makes the curve's points."""

    def __init__(self, ctx: PassContext, evalset: Dataset) -> None:
        self.ctx = ctx
        self.original = cost_model(Graph.from_model(ctx.teacher))
        self.ev = Evaluator(ctx.teacher, evalset, metric=ctx.metric)
        self.metric_name = self.ev.spec.name
        self.base = self.ev.reference_value

    def point(self, step: int, g: Graph) -> dict:
        """The curve's point for ``g`` after ``step`` steps: size ratios, metric, drop in points."""
        m = self.ev.score(g.to_model()).value
        c = self.ctx.analysis(cost_model, g)  # the inner passes (prune-channels) may have it already
        return {
            "step": step,
            "r_params": round(c.params / self.original.params, 6),
            "r_macs": round(c.macs / self.original.macs, 6) if self.original.macs else None,
            self.metric_name: round(m, 6),
            "drop_points": round(100 * (self.base - m), 4),
        }


def _merge_skips(records: list[PassRecord], skipped: list[Skip]) -> None:
    """What the inner passes left alone reaches the report, once."""
    for r in records:
        for s in r.skipped:
            inner = Skip(s.where, f"{r.name}: {s.reason}")
            if inner not in skipped:
                skipped.append(inner)
