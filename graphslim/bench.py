"""Latency measurement: medians of repeated runs, never single timings."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx

from graphslim.data import Dataset

__all__ = ["measure_callable", "measure_ort", "measure_tvm"]


def measure_ort(model: onnx.ModelProto, data: Dataset, *, batch: int = 1, warmup: int = 5, repeat: int = 30,
                max_seconds: float = 5.0, threads: int = 0) -> dict[str, Any]:
    """Median / p90 latency in ms of ONNX Runtime (all graph optimizations on) on one batch.

    Stops early after ``max_seconds`` of timed runs (at least 3 runs), so big models stay cheap.
    """
    from graphslim.verify import ort_session

    sess = ort_session(model, optimize=True, threads=threads)
    feeds = _batch_of(data, batch)
    return measure_callable(lambda: sess.run(None, feeds), batch, warmup, repeat, max_seconds)


def measure_tvm(runner: Any, data: Dataset, *, warmup: int = 5, repeat: int = 30, max_seconds: float = 5.0
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
    return {"batch": batch, "runs": len(times), "median_ms": round(float(np.median(arr)), 4),
            "p90_ms": round(float(np.percentile(arr, 90)), 4), "p99_ms": round(float(np.percentile(arr, 99)), 4),
            "throughput_per_s": round(batch / (float(np.median(arr)) / 1e3), 2)}


def _batch_of(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    head = data.take(batch)
    idx = np.arange(batch) % len(head)
    return {k: v[idx] for k, v in head.inputs.items()}
