"""The pass context (target, data, seed, cached analyses) and the pass manager.

The manager runs a pipeline; after each pass that changed the graph it re-infers shapes and
drops cached analyses. With ``verify`` it checks every step (onnx.checker, ONNX Runtime runs it,
outputs equal within ``rtol`` for exact passes; deviation recorded for lossy ones), and a pass
that breaks the model is an error naming the pass.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx

from graphslim.core.data import Dataset
from graphslim.core.errors import GraphslimError, InputError, PassError, VerificationError
from graphslim.core.ir import Graph
from graphslim.pipeline.registry import Pass, Skip
from graphslim.pipeline.text import Pipeline

__all__ = ["PassContext", "PassManager", "PassRecord"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- context

T = TypeVar("T")


@dataclass
class PassContext:
    """What passes may read besides the graph: target, data, seed, verification, analyses.

    Analyses are functions ``f(graph, ctx) -> result``; :meth:`analysis` computes each once per
    graph version and reuses it until the graph changes.
    """

    target: str | None = None
    data: Dataset | None = None  # training / calibration data
    eval_data: Dataset | None = None  # held-out data; passes that need one split `data` without it
    seed: int = 0
    verify: bool = False
    rtol: float = 1e-4
    teacher: onnx.ModelProto | None = None  # the model as it was before the pipeline
    progress: bool = False
    shapes: dict[str, tuple[int, ...]] | None = None  # --shape bindings of symbolic input dims
    metric: str = "auto"  # how passes judge outputs (graphslim.core.metrics.METRICS)
    # (analysis, id(graph)) -> (graph version, result, weak reference to the graph): the reference
    # tells a live graph from a dead one whose id Python gave to a new graph.
    _cache: dict[tuple[Any, int], tuple[int, Any, Any]] = field(default_factory=dict, repr=False)

    def analysis(self, fn: Callable[[Graph, PassContext], T], graph: Graph) -> T:
        """``fn(graph, self)``, computed once per graph version and reused until the graph changes
        (or, for analyses a pass preserved, beyond)."""
        key = (fn, id(graph))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == graph.version and hit[2]() is graph:
            return hit[1]
        result = fn(graph, self)
        self._cache[key] = (graph.version, result, weakref.ref(graph))
        return result

    def invalidate(self, graph: Graph, preserved: tuple[Any, ...] = ()) -> None:
        """After a change to ``graph``: drop its cached analyses except ``preserved`` ones, which
        stay valid for the graph as it is now."""
        for key in [k for k, v in self._cache.items() if k[1] == id(graph)]:
            _, result, ref = self._cache[key]
            if key[0] in preserved and ref() is graph:
                self._cache[key] = (graph.version, result, ref)
            else:
                del self._cache[key]

    def train_eval_split(self, eval_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
        """(train, eval): ``eval_data`` if given, else a seeded split of ``data``."""
        if self.data is None:
            raise GraphslimError("this pass needs a data set: give --data (and optionally --eval-data)")
        if self.eval_data is not None:
            return self.data, self.eval_data
        if len(self.data) < 2:
            raise GraphslimError("the data set has fewer than 2 samples: cannot hold any out for evaluation")
        return self.data.split(eval_fraction, self.seed)

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from the context seed and ``salt`` (e.g. the pass name)."""
        return np.random.default_rng([self.seed, *salt.encode()])


# --------------------------------------------------------------------------- manager


@dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    text: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    skipped: list[Skip]
    verification: dict[str, Any] | None = None
    not_run: str | None = None  # why the pass could not run at all

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "pipeline": self.text,
            "changed": self.changed,
            "seconds": round(self.seconds, 4),
            "stats": self.stats,
            "skipped": [s.to_dict() for s in self.skipped],
            "verification": self.verification,
        }
        if self.not_run:
            d["not_run"] = self.not_run
        return d


class _Verifier:
    """Holds sample inputs and the previous model's outputs; checks each step.

    NaN or Inf in outputs fail loudly: in the input model's outputs it is an input error (the
    model or the data, not a pass), after a pass it is a verification failure of that pass."""

    def __init__(self, graph: Graph, ctx: PassContext):
        from graphslim.core.data import random_inputs
        from graphslim.core.metrics import nonfinite_outputs

        model = graph.to_model()
        self.on = "the data" if ctx.data is not None else "seeded random inputs"
        self.samples = ctx.data.take(16) if ctx.data is not None else random_inputs(model, 4, ctx.seed)
        self.rtol = ctx.rtol
        self.prev = self._run(model, "the input model")
        bad = nonfinite_outputs(self.prev)
        if bad:
            raise InputError(
                f"the input model's outputs hold NaN or Inf on {self.on} ({self._describe(model, bad)}): "
                "--verify has nothing finite to compare against"
            )

    @staticmethod
    def _describe(model: onnx.ModelProto, bad: list[tuple[int, int]]) -> str:
        names = [o.name for o in model.graph.output]
        return ", ".join(f"output '{names[i] if i < len(names) else i}': {n} values" for i, n in bad)

    def _run(self, model: onnx.ModelProto, what: str) -> list[np.ndarray]:
        from graphslim.core.runtime import ort_session, run_model

        try:
            return run_model(ort_session(model), self.samples)
        except Exception as e:  # noqa: BLE001 - ORT raises many types
            raise GraphslimError(f"{what} does not run in ONNX Runtime: {str(e).strip().splitlines()[0]}") from None

    def check(self, p: Pass, graph: Graph) -> dict[str, Any]:
        from graphslim.core.metrics import compare_outputs, nonfinite_outputs

        model = graph.to_model()
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise GraphslimError(f"invalid ONNX model after the pass: {str(e).splitlines()[0]}") from None
        new = self._run(model, "the model after the pass")
        bad = nonfinite_outputs(new)
        if bad:
            raise GraphslimError(f"outputs hold NaN or Inf after the pass on {self.on} ({self._describe(model, bad)})")
        try:
            fid = compare_outputs(self.prev, new)
        except ValueError as e:
            raise GraphslimError(str(e)) from None
        result = {"checker": "ok", "runs": True, "exact": p.exact, **fid.to_dict()}
        if p.exact and fid.max_rel_diff > self.rtol:
            raise GraphslimError(
                f"outputs changed by {fid.max_rel_diff:.3g} (relative), more than rtol={self.rtol:g} "
                "allowed for an exact pass"
            )
        self.prev = new
        return result


class PassManager:
    """Runs a pipeline of passes over a graph; see the module docstring."""

    def __init__(self, pipeline: Pipeline | str | Sequence[Pass]):
        if isinstance(pipeline, str):
            pipeline = Pipeline.parse(pipeline)
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(list(pipeline))

    def run(self, graph: Graph, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        verifier = _Verifier(graph, ctx) if ctx.verify else None
        ran: list[str] = []
        for p in self.pipeline:
            text = str(p)
            log.info("running %s", text)
            t0 = time.perf_counter()
            version = graph.version
            fingerprint = graph.fingerprint() if verifier is not None else None
            try:
                result = p.run(graph, ctx)
                # A pass that edited the graph through the facade changed it, whatever it says,
                # unless it rolled it back to a snapshot of where it started.
                changed = result.changed or (graph.version != version and graph.restored_from() != version)
                if changed:
                    graph.version += 1
                    graph.infer_shapes()
                    ctx.invalidate(graph, tuple(result.preserves))
            except GraphslimError as e:
                if isinstance(e, PassError):
                    raise
                raise PassError(text, ran, e) from e
            except SystemExit as e:  # a plugin pass must not end graphslim (with exit 0, having written nothing)
                raise PassError(text, ran, f"the pass called sys.exit({e.code!r})") from None
            except Exception as e:  # noqa: BLE001 - an internal bug: name the pass
                raise PassError(text, ran, f"{type(e).__name__}: {e}") from e
            if fingerprint is not None and not changed and graph.fingerprint() != fingerprint:
                raise VerificationError(text, ran, "the pass reported no change but the graph changed")
            seconds = time.perf_counter() - t0
            verification = None
            if verifier is not None:
                try:
                    verification = verifier.check(p, graph)
                except GraphslimError as e:
                    raise VerificationError(text, ran, e) from e
            if result.not_run:
                log.info("%s did not run: %s", text, result.not_run)
            records.append(
                PassRecord(p.name, text, changed, seconds, result.stats, result.skipped, verification, result.not_run)
            )
            ran.append(text)
        return records
