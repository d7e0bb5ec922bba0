"""Latency measurement: medians of repeated runs, never single timings; comparisons interleaved.

One timing loop (:func:`time_runs`). :func:`measure_callable` times one thing;
:func:`measure_interleaved` times several (a baseline and a model) in alternating rounds in the
same process, so that each round's ratio compares them under the same load; the ratio reported
is the median of the per-round ratios (on a shared machine the load moves by more than the
difference being measured within seconds: ResNet-50 timed once per process gave 12.0x where the
interleaved ratio was 8.6x).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset

__all__ = [
    "summarize_times",
    "Contender",
    "PeakMemory",
    "measure_callable",
    "measure_interleaved",
    "measure_ort",
    "measure_tvm",
    "artifact_inputs",
    "batch_of",
    "ort_contender",
    "time_runs",
    "tvm_contender",
]


def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory a block of work adds to the process: ``extra_mb`` = peak resident set during the
    block minus the resident set before it (Linux: the peak is reset through
    /proc/self/clear_refs first; elsewhere the process peak so far is used, which can only
    overstate the baseline). Use as ``with PeakMemory() as mem: ...; mem.result()``."""

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = _status_kb("VmHWM")

    def result(self) -> dict[str, float]:
        if self.before is None or self.peak is None:
            return {}
        return {"peak_rss_mb": round(self.peak / 1024, 1), "extra_mb": round(max(0, self.peak - self.before) / 1024, 1)}


def time_runs(fn: Callable[[], Any], runs: int, max_seconds: float = float("inf"), min_runs: int = 3) -> list[float]:
    """Milliseconds of up to ``runs`` calls of ``fn``, stopping after ``max_seconds`` (but not
    before ``min_runs`` calls). The only timing loop in graphslim."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < min_runs or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize_times(times: list[float], batch: int) -> dict[str, Any]:
    """The statistics every latency figure reports, from single-call times in ms (local or on a
    device): batch, runs, median, p90, p99 and throughput."""
    arr = np.asarray(times)
    median = float(np.median(arr))
    return {
        "batch": batch,
        "runs": len(times),
        "median_ms": round(median, 4),
        "p90_ms": round(float(np.percentile(arr, 90)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "throughput_per_s": round(batch / (max(median, 1e-6) / 1e3), 2),
    }


def measure_callable(fn: Any, batch: int, warmup: int, repeat: int, max_seconds: float) -> dict[str, Any]:
    """Median / p90 / p99 latency of ``fn`` (one batch of ``batch`` samples per call) after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return summarize_times(time_runs(fn, repeat, max_seconds), batch)


@dataclass
class Contender:
    """One thing :func:`measure_interleaved` times: ``run()`` computes one batch."""

    label: str
    run: Callable[[], Any]
    batch: int
    info: dict[str, Any] = field(default_factory=dict)  # copied into the result (path, runtime, memory...)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # the inputs run() uses


def measure_interleaved(
    contenders: list[Contender],
    *,
    warmup: int = 10,
    repeat: int = 100,
    rounds: int = 7,
    max_seconds: float = 30.0,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """Time ``contenders`` in ``rounds`` rounds; in each round every contender runs a block of
    about ``repeat / rounds`` timed calls (after a short untimed warm-up, so that one runtime's
    threads winding down do not land in the other's timings). Each result has the statistics of
    all its timed calls and ``round_medians_ms``; with ``baseline`` (a label), the others get
    ``vs_baseline``: the median over rounds of (their round median / the baseline's round
    median), and ``round_ratios``. ``max_seconds`` bounds each contender's timed calls."""
    for c in contenders:
        for _ in range(warmup):
            c.run()
    rounds = max(1, min(rounds, repeat))
    per_round = max(1, repeat // rounds)
    settle = max(1, min(3, warmup))
    times: dict[str, list[float]] = {c.label: [] for c in contenders}
    medians: dict[str, list[float]] = {c.label: [] for c in contenders}
    budget = max_seconds / rounds
    for _ in range(rounds):
        for c in contenders:
            for _ in range(settle):
                c.run()
            block = time_runs(c.run, per_round, budget, min_runs=1)
            times[c.label].extend(block)
            medians[c.label].append(float(np.median(block)))
    results = []
    for c in contenders:
        r = {
            **c.info,
            **summarize_times(times[c.label], c.batch),
            "round_medians_ms": [round(m, 4) for m in medians[c.label]],
        }
        if baseline is not None and baseline in medians:
            ratios = [m / b for m, b in zip(medians[c.label], medians[baseline], strict=True)]
            r["round_ratios"] = [round(x, 4) for x in ratios]
            r["vs_baseline"] = round(float(np.median(ratios)), 4)
        else:
            r["vs_baseline"] = None
        results.append(r)
    return results


def batch_of(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of ``data`` (repeated where it has fewer)."""
    head = data.take(batch)
    idx = np.arange(batch) % len(head)
    return {k: v[idx] for k, v in head.inputs.items()}


def ort_contender(
    label: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int, *, threads: int = 0, warm: int = 1
) -> Contender:
    """ONNX Runtime (all graph optimizations on) on ``feeds``; ``info["memory"]`` is what creating
    the session and ``warm`` runs added to the process (the onnxruntime import excluded)."""
    from graphslim.core.runtime import ort_session, require_onnxruntime

    require_onnxruntime()  # imported before measuring memory: the library is not the model
    with PeakMemory() as mem:
        sess = ort_session(model, optimize=True, threads=threads)
        for _ in range(warm):
            sess.run(None, feeds)
    info = {"runtime": "onnxruntime", "memory": mem.result(), **({"threads": threads} if threads else {})}
    return Contender(label, lambda: sess.run(None, feeds), batch, info, feeds)


def tvm_contender(
    label: str,
    folder: Any,
    threads: int | None = None,
    feeds: Callable[[dict[str, Any]], dict[str, np.ndarray]] | None = None,
    warm: int = 1,
) -> Contender:
    """A compiled artifact (at its static batch) on ``feeds(meta)`` (default: seeded random
    inputs of its shapes); ``info["memory"]`` is what loading it and ``warm`` runs added (the TVM
    import excluded)."""
    from graphslim.backend.driver import artifact_meta, load_artifact, require_tvm

    artifact_meta(folder)  # a bad artifact.json is named before TVM is needed
    require_tvm()
    with PeakMemory() as mem:
        runner = load_artifact(folder, threads=threads)
        inputs = (feeds or artifact_inputs)(runner.meta)
        for _ in range(warm):
            runner(inputs)
    info = {
        "runtime": f"tvm ({runner.meta['target']})",
        "threads": runner.threads,
        "threads_from": runner.threads_from,
        "memory": mem.result(),
    }
    return Contender(label, lambda: runner(inputs), runner.meta["batch"], info, inputs)


def artifact_inputs(meta: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of an artifact's static shapes (integers 0/1, floats standard normal)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in meta["inputs"]:
        dtype = np.dtype(i["dtype"])
        if dtype.kind == "f":
            feeds[i["name"]] = rng.standard_normal(i["shape"]).astype(dtype)
        else:
            feeds[i["name"]] = rng.integers(0, 2, size=i["shape"]).astype(dtype)
    return feeds


def measure_ort(
    model: onnx.ModelProto,
    data: Dataset,
    *,
    batch: int = 1,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 5.0,
    threads: int = 0,
) -> dict[str, Any]:
    """Median / p90 latency in ms of ONNX Runtime (all graph optimizations on) on one batch.

    Stops early after ``max_seconds`` of timed runs (at least 3 runs), so big models stay cheap.
    """
    c = ort_contender("model", model, batch_of(data, batch), batch, threads=threads)
    return {**measure_callable(c.run, batch, warmup, repeat, max_seconds), "memory": c.info["memory"]}


def measure_tvm(
    runner: Any, data: Dataset, *, warmup: int = 5, repeat: int = 30, max_seconds: float = 5.0
) -> dict[str, Any]:
    """The same for a compiled artifact (graphslim.backend.load_artifact), at its static batch.

    Time ONNX Runtime and numpy before this in a process when TVM runs on several threads: its
    spinning workers slow them afterwards (measured here: numpy ~17x)."""
    batch = runner.meta["batch"]
    feeds = batch_of(data, batch)
    return measure_callable(lambda: runner(feeds), batch, warmup, repeat, max_seconds)
