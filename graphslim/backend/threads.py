"""How many threads TVM runs an artifact on, set per loaded artifact through TVM's thread-pool API
(:mod:`graphslim.kernels.threadpool`), never through the environment.

A parallel TVM kernel splits its loop statically across the threads and waits for the slowest,
so one worker that the OS does not schedule for a time slice (another process holds its CPU)
stalls the whole kernel. On a busy 2-CPU machine that makes two threads bimodal for small
models, hence a default that depends on the model's size (:func:`default_threads`).
"""

from __future__ import annotations

import logging
import os
import threading

from graphslim.kernels.threadpool import available_cpus, configure

__all__ = ["PARALLEL_MIN_MODEL_MACS", "available_cpus", "default_threads", "resolve_threads", "use_threads"]

log = logging.getLogger(__name__)

#: Multiply-adds per inference from which the default uses every CPU; below it, one thread.
#: Measured on the project's busy 2-CPU machine (benchmarks/RESULTS.md, "Threads"): a
#: 2.7M-MAC CNN and a 27M-MAC ResNet-style net ran faster and with far shorter tails on one
#: thread (p90 0.26 vs 3.9 ms for the CNN); a 436M-MAC BERT-style encoder ran faster on two
#: even under load. Small models gain little from a second thread on an idle machine either.
PARALLEL_MIN_MODEL_MACS = 100_000_000

_state = threading.local()  # the thread count this thread's TVM pool is configured for


def default_threads(macs: int | None = None) -> tuple[int, str]:
    """(threads, why) when neither the command nor the artifact says: ``TVM_NUM_THREADS`` if the
    user set it; else one thread for a model of fewer than :data:`PARALLEL_MIN_MODEL_MACS`
    multiply-adds per inference (``macs``, recorded in artifact.json), every CPU the process may
    use otherwise (and when ``macs`` is unknown)."""
    env = os.environ.get("TVM_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n, "TVM_NUM_THREADS"
        log.warning("ignoring TVM_NUM_THREADS=%r (not a positive integer)", env)
    if macs is not None and macs < PARALLEL_MIN_MODEL_MACS:
        return 1, f"small model (< {PARALLEL_MIN_MODEL_MACS // 1_000_000}M multiply-adds)"
    return len(available_cpus()), "all CPUs"


def resolve_threads(requested: int | None, compiled: int | None = None, macs: int | None = None) -> tuple[int, str]:
    """The thread count to run with and where it came from: ``requested`` (``--threads``), else
    the artifact's (``compile --threads``), else :func:`default_threads` for ``macs``."""
    if requested is not None:
        return requested, "--threads"
    if compiled is not None:
        return compiled, "artifact"
    return default_threads(macs)


def use_threads(n: int) -> int:
    """Configure TVM's thread pool of the calling thread for ``n`` threads (at most the CPUs
    available) and return the count TVM reports. A no-op when this thread is already set to ``n``.
    Fewer than asked when the pool was created before graphslim configured it (something in this
    thread ran a parallel TVM kernel first): the pool cannot grow past its first size."""
    if getattr(_state, "threads", None) == n:
        return _state.effective
    want = max(1, min(n, len(available_cpus())))
    got = configure(want)
    if got != want:
        log.warning("TVM runs on %d thread(s), not %d: its thread pool in this thread was sized earlier", got, want)
    _state.threads, _state.effective = n, got
    return got
