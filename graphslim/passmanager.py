"""Passes, their registry, the pass context with cached analyses, and the pass manager.

A pass is a class with a kebab-case ``name``, a docstring (what it does, what it refuses), a frozen
``Options`` dataclass with defaults, and ``run(graph, ctx) -> PassResult``. ``@register_pass``
puts it in the one registry; other packages add passes through the ``graphslim.passes``
entry-point group (an entry point names a module that registers passes, or a Pass class).

The manager runs a pipeline; after each pass that changed the graph it re-infers shapes and
drops cached analyses. With ``verify`` it checks every step (onnx.checker, ONNX Runtime runs it,
outputs equal within ``rtol`` for exact passes; deviation recorded for lossy ones), and a pass
that breaks the model is an error naming the pass.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx

from graphslim.data import Dataset
from graphslim.errors import GraphslimError, PassError, PipelineError, VerificationError
from graphslim.ir import Graph
from graphslim.pipeline import Pipeline, format_options

__all__ = [
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "Skip",
    "get_pass",
    "register_pass",
    "registered_passes",
]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ENTRY_POINT_GROUP = "graphslim.passes"


@dataclass(frozen=True)
class Skip:
    """Part of the graph a pass left alone, and why (this reaches the report)."""

    where: str  # a node or group name
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason}


@dataclass
class PassResult:
    """What a pass returns: whether it changed the graph, its stats, and what it left alone."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


class Pass:
    """Base class for passes. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    #: Exact passes must not change outputs; --verify holds them to ``PassContext.rtol``.
    exact: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("give options or keyword options, not both")
        if options is None:
            from graphslim.pipeline import coerce_options

            options = coerce_options(self.name, self.Options, kwargs)
        self.options = options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name + format_options(self.options)

    def __repr__(self) -> str:
        return f"<pass {self}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pass) and (self.name, self.options) == (other.name, other.options)

    def __hash__(self) -> int:
        return hash((self.name, str(self)))


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    name = cls.name
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"pass name {name!r} of {cls.__qualname__} is not kebab-case")
    if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__qualname__}.Options must be a frozen dataclass")
    for f in dataclasses.fields(cls.Options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__qualname__}.Options.{f.name} needs a default")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass '{name}' registered twice ({existing.__module__} and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_passes() -> None:
    """Import the built-in passes and every ``graphslim.passes`` entry point (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from importlib.metadata import entry_points

    import graphslim.passes  # noqa: F401 - registers the built-in passes

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break graphslim
            log.warning("cannot load pass plugin '%s' (%s): %s", ep.name, ep.value, e)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)


def registered_passes() -> dict[str, type[Pass]]:
    """All passes by name: the built-in ones and those of installed plugins."""
    _load_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; a :class:`PipelineError` listing the valid names if none is."""
    _load_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown pass '{name}' (passes: {', '.join(sorted(_REGISTRY))})") from None


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
    _cache: dict[tuple[Any, int], tuple[int, Any]] = field(default_factory=dict, repr=False)

    def analysis(self, fn: Callable[[Graph, PassContext], T], graph: Graph) -> T:
        key = (fn, id(graph))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == graph.version:
            return hit[1]
        result = fn(graph, self)
        self._cache[key] = (graph.version, result)
        return result

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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pipeline": self.text, "changed": self.changed, "seconds": round(self.seconds, 4),
                "stats": self.stats, "skipped": [s.to_dict() for s in self.skipped],
                "verification": self.verification}


class _Verifier:
    """Holds sample inputs and the previous model's outputs; checks each step."""

    def __init__(self, graph: Graph, ctx: PassContext):
        from graphslim.data import random_inputs

        model = graph.to_model()
        self.samples = ctx.data.take(16) if ctx.data is not None else random_inputs(model, 4, ctx.seed)
        self.rtol = ctx.rtol
        self.prev = self._run(model, "the input model")

    def _run(self, model: onnx.ModelProto, what: str) -> list[np.ndarray]:
        from graphslim.verify import ort_session, run_model

        try:
            return run_model(ort_session(model), self.samples)
        except Exception as e:  # noqa: BLE001 - ORT raises many types
            raise GraphslimError(f"{what} does not run in ONNX Runtime: {str(e).strip().splitlines()[0]}") from None

    def check(self, p: Pass, graph: Graph) -> dict[str, Any]:
        from graphslim.verify import compare_outputs

        model = graph.to_model()
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise GraphslimError(f"invalid ONNX model after the pass: {str(e).splitlines()[0]}") from None
        new = self._run(model, "the model after the pass")
        try:
            fid = compare_outputs(self.prev, new)
        except ValueError as e:
            raise GraphslimError(str(e)) from None
        result = {"checker": "ok", "runs": True, "exact": p.exact, **fid.to_dict()}
        if p.exact and fid.max_rel_diff > self.rtol:
            raise GraphslimError(f"outputs changed by {fid.max_rel_diff:.3g} (relative), more than rtol={self.rtol:g} "
                                 "allowed for an exact pass")
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
            try:
                result = p.run(graph, ctx)
                if result.changed:
                    graph.version += 1
                    graph.infer_shapes()
            except GraphslimError as e:
                if isinstance(e, PassError):
                    raise
                raise PassError(text, ran, e) from e
            except Exception as e:  # noqa: BLE001 - an internal bug: name the pass
                raise PassError(text, ran, f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            verification = None
            if verifier is not None:
                try:
                    verification = verifier.check(p, graph)
                except GraphslimError as e:
                    raise VerificationError(text, ran, e) from e
            records.append(PassRecord(p.name, text, result.changed, seconds, result.stats, result.skipped,
                                      verification))
            ran.append(text)
        return records
