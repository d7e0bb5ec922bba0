"""The options of one run, as one frozen object built by the CLI, recipes and the Python API alike.

``RunOptions`` travels whole from the caller down to the run (as TVM's ``PassContext`` or LLVM's
``PipelineTuningOptions`` do): what a run does is what this object says, and its fields are what
the cache key hashes. Compile settings and budgets are sub-objects because other commands
(``compile``, ``bench``, ``search``) take them alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from graphslim.backend.options import CompileOptions
from graphslim.core.data import Dataset
from graphslim.core.errors import InputError
from graphslim.core.metrics import METRICS
from graphslim.pipeline import Pipeline

__all__ = ["TECHNIQUES", "Budgets", "CompileOptions", "DataSource", "RunOptions", "SearchOptions"]

#: A data set given as a path (``.npz``, a folder of shards, ``module:function``) or in memory.
DataSource = str | os.PathLike[str] | Dataset | None


def _finite(name: str, value: float | None, *, positive: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class Budgets:
    """Limits checked after the run; a missed one is reported (and the CLI exits 3)."""

    max_accuracy_drop: float | None = None  # points of top-1 accuracy (or of the model's metric)
    min_compression: float | None = None  # r = params after / before must be at most this
    max_latency_ms: float | None = None  # ONNX Runtime latency of the result, batch 1, median

    def __post_init__(self) -> None:
        _finite("--max-accuracy-drop", self.max_accuracy_drop)
        _finite("--min-compression", self.min_compression, positive=True)
        _finite("--max-latency-ms", self.max_latency_ms, positive=True)

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


@dataclass(frozen=True)
class RunOptions:
    """Everything ``optimize`` needs besides the model and the output folder."""

    pipeline: str | Pipeline | None = None  # None: the canonicalization pipeline
    data: DataSource = None  # trains, calibrates and (a held-out part of it) evaluates
    train_data: DataSource = None  # replaces ``data`` for training and calibration
    eval_data: DataSource = None  # replaces the held-out part of ``data`` for the report
    eval_fraction: float = 0.2  # held out of ``data`` for the report when no ``eval_data`` is given
    metric: str = "auto"  # how outputs are judged (graphslim.core.metrics.METRICS): passes, budget, report
    verify: bool = False
    seed: int = 0
    measure_latency: bool = True
    progress: bool = False
    cache_dir: str | os.PathLike[str] | None = None
    # Replace an output folder graphslim did not write (never an input's folder, a link or the current folder).
    force: bool = False
    budgets: Budgets = field(default_factory=Budgets)
    compile: CompileOptions = field(default_factory=CompileOptions)

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise InputError("eval_fraction must be in (0, 1)")
        if self.metric not in METRICS:
            raise InputError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")

    @classmethod
    def build(cls, base: RunOptions | None = None, **kwargs: Any) -> RunOptions:
        """``base`` (or the defaults) with ``kwargs`` applied. Budget and compile fields may be
        given flat (``max_accuracy_drop=1``, ``target="x86"``, ``tune=8``), as the Python API
        always accepted them."""
        opts = base or cls()
        own = {f.name for f in fields(cls)}
        budget_keys = {f.name for f in fields(Budgets)}
        compile_keys = {f.name for f in fields(CompileOptions)}
        direct = {k: v for k, v in kwargs.items() if k in own}
        budgets = {k: v for k, v in kwargs.items() if k in budget_keys}
        comp = {k: v for k, v in kwargs.items() if k in compile_keys and k not in own}
        unknown = set(kwargs) - own - budget_keys - compile_keys
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
        if "shapes" in comp and isinstance(comp["shapes"], Mapping):
            comp["shapes"] = tuple((k, tuple(int(d) for d in v)) for k, v in comp["shapes"].items())
        if "tuning_db" in comp and comp["tuning_db"] is not None:
            comp["tuning_db"] = str(comp["tuning_db"])
        if budgets:
            direct["budgets"] = replace(opts.budgets, **budgets)
        if comp:
            direct["compile"] = replace(opts.compile, **comp)
        return replace(opts, **direct)


#: The knob families ``graphslim search`` combines (each exists where its pass applies).
TECHNIQUES = ("prune", "heads", "svd", "int8", "sparse")


@dataclass(frozen=True)
class SearchOptions:
    """What ``graphslim search`` adds to a run: ``run`` holds the data, seed, budgets and target
    that ``optimize`` takes (its ``pipeline`` is ignored: the search writes it)."""

    run: RunOptions = field(default_factory=RunOptions)
    objective: str = "latency"  # latency | bytes | macs
    trials: int = 100  # full evaluations in the study, all workers together
    timeout: float | None = None  # seconds per worker
    storage: str | None = None  # an Optuna storage URL; None: sqlite:///<OUT>.search/study.db
    study: str | None = None  # None: a name derived from the model, data and settings
    resume: bool = False  # the study must exist already
    workers: int = 1  # processes on this machine sharing the study
    techniques: tuple[str, ...] = TECHNIQUES
    sampler: str = "tpe"  # tpe | nsga2
    sensitivity_samples: int = 500  # held-out samples for the one-knob-at-a-time pass
    validate: int = 8  # best candidates within the budgets (by estimate) timed end to end
    batch: int = 1  # the batch size latency is timed at
    threads: int | None = None  # runtime threads when timing (None: the runtime's default)
    clock: str = "wall"  # wall | cpu (single-thread CPU time: for shared machines)

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "bytes", "macs"):
            raise InputError(f"--objective must be latency, bytes or macs, got {self.objective!r}")
        if min(self.trials, self.workers, self.validate, self.sensitivity_samples, self.batch) < 1:
            raise InputError("--trials, --workers, --validate, --sensitivity-samples and --batch must be >= 1")
        _finite("--timeout", self.timeout, positive=True)
        bad = sorted(set(self.techniques) - set(TECHNIQUES))
        if bad or not self.techniques:
            raise InputError(f"--techniques: choose from {', '.join(TECHNIQUES)} (got {', '.join(bad) or 'none'})")
        if self.sampler not in ("tpe", "nsga2"):
            raise InputError(f"--sampler must be tpe or nsga2, got {self.sampler!r}")
