"""Latency measurement: medians of repeated runs, never single timings."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset

__all__ = ["PeakMemory", "measure_callable", "measure_ort", "measure_tvm"]


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
    from graphslim.core.runtime import ort_session

    feeds = _batch_of(data, batch)
    with PeakMemory() as mem:
        sess = ort_session(model, optimize=True, threads=threads)
        result = measure_callable(lambda: sess.run(None, feeds), batch, warmup, repeat, max_seconds)
    return {**result, "memory": mem.result()}


def measure_tvm(
    runner: Any, data: Dataset, *, warmup: int = 5, repeat: int = 30, max_seconds: float = 5.0
) -> dict[str, Any]:
    """The same for a compiled artifact (graphslim.backend.load_artifact), at its static batch.

    Time ONNX Runtime and numpy before this in a process: TVM's spinning thread pool slows
    them afterwards (measured here: numpy ~17x)."""
    batch = runner.meta["batch"]
    feeds = _batch_of(data, batch)
    return measure_callable(lambda: runner(feeds), batch, warmup, repeat, max_seconds)


def measure_callable(fn: Any, batch: int, warmup: int, repeat: int, max_seconds: float) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(times)
    return {
        "batch": batch,
        "runs": len(times),
        "median_ms": round(float(np.median(arr)), 4),
        "p90_ms": round(float(np.percentile(arr, 90)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "throughput_per_s": round(batch / (float(np.median(arr)) / 1e3), 2),
    }


def _batch_of(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    head = data.take(batch)
    idx = np.arange(batch) % len(head)
    return {k: v[idx] for k, v in head.inputs.items()}
