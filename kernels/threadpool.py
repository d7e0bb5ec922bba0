"""TVM's CPU thread pool of the calling thread, resized through TVM's runtime API.

TVM keeps one thread pool per calling thread, sized when it is first used: from
``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) when set, else half the logical CPUs (TVM assumes
two SMT siblings per core, so a 2-CPU VM gets one thread). ``runtime.config_threadpool(mode,
nthreads, cpus)`` resizes it for the calling thread; with mode -3 (``kSpecifyThreadShareAllCore``)
every worker may run on any CPU of ``cpus`` (no pinning: on a shared machine a worker whose CPU is
busy can move), and the pool can grow to ``len(cpus)`` threads if this call is the first to touch
it in that thread (a pool that exists keeps its first size as the upper bound).

The policy (how many threads) is the backend's (:mod:`graphslim.backend.threads`); this module
only applies a number, here and in MetaSchedule's measuring workers. Importing it does not
import TVM.
"""

from __future__ import annotations

import os

__all__ = ["available_cpus", "configure"]

_SHARE_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def configure(threads: int) -> int:
    """Size the calling thread's TVM pool to ``threads`` (1 to the CPUs available) with floating
    workers; returns the thread count TVM reports afterwards."""
    import tvm_ffi

    cpus = available_cpus()
    tvm_ffi.get_global_func("runtime.config_threadpool")(
        _SHARE_ALL_CORES, max(1, min(threads, len(cpus))), [str(c) for c in cpus]
    )
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())
