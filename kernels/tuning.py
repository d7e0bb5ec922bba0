"""MetaSchedule tuning of a legalized, fused Relax module, with a reusable tuning database.

``tune(mod, target, trials, work_dir)`` extracts the module's kernels (fused PrimFuncs), skips
those the database in ``work_dir`` already holds records for (so build systems do not re-tune an
unchanged model), tunes the rest with ``trials`` measurements in total, and returns the
database; :func:`graphslim.kernels.pipeline.cpu_pipeline` then applies it, and graphslim's
default rules schedule whatever it does not cover.

Measurements run locally (a process pool) or, with ``rpc=("host:port", key)``, on the devices
registered with a TVM RPC tracker under that key (``python -m tvm.exec.rpc_tracker`` /
``python -m tvm.exec.rpc_server --tracker host:port --key KEY``), as many in parallel as the key
has devices. Records measured on a device go to ``work_dir/rpc-<key>/<target>/`` (see
:func:`database_dir`): a second build for the same target and device key reuses them, and
neither local records nor another board's are taken for this one's. Candidates for an AArch64
target are linked into a shared library here with ``aarch64-linux-gnu-gcc`` when it is installed
(a board's RPC server then needs no compiler); otherwise they travel as object files that the
board links.

What TVM 0.27's defaults get wrong here, and what this module does instead:
* the default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (20-40 s on this
  machine) and times out at 30 s: our builder calls ``tvm.tirx.build`` directly;
* the default runner fills every argument with random data, which makes index buffers
  (sparse kernels) point out of bounds: integer arguments are zero-filled;
* ``apache-tvm-ffi`` 0.1.15 crashes the JSON database (hence the pin in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["database_dir", "tune"]

log = logging.getLogger(__name__)


def build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule builder function: build one candidate without importing tensor intrinsics."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


#: The cross linker for AArch64 candidates (Debian's gcc-aarch64-linux-gnu).
AARCH64_CC = "aarch64-linux-gnu-gcc"


def export_kernel_aarch64(mod: Any) -> str:
    """MetaSchedule export function for AArch64 candidates: a shared library linked here, which a
    board's RPC server loads without a compiler of its own (TVM's default sends object files in
    a tar that the board must link)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="graphslim-candidate-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(AARCH64_CC))
    return path


def database_dir(work_dir: str | Path, target: Any, rpc: tuple[str, str] | None) -> Path:
    """Where the records of ``target`` measured on ``rpc``'s devices live in a tuning database
    folder: ``work_dir`` itself for local measurements, else ``work_dir/rpc-<key>/<target tag>``
    (the tag names the CPU or triple and hashes the whole target), so that a build reuses only
    records measured on the same kind of device for the same target."""
    work_dir = Path(work_dir)
    if not rpc:
        return work_dir
    text = str(target)
    attrs = getattr(target, "attrs", {}) or {}
    name = str(attrs.get("mcpu") or attrs.get("mtriple") or getattr(target.kind, "name", "target"))
    tag = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", rpc[1]) or "_"
    return work_dir / f"rpc-{key}" / re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def alloc_arguments(device: Any, args_info: Any, alloc_repeat: int) -> list[Any]:
    """MetaSchedule runner argument allocation: random floats, zero integers."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            _, dtype, shape = info
            dtype = str(dtype)
            if dtype.startswith(("int", "uint", "bool")):
                value = np.zeros(shape, dtype=dtype)
            else:
                value = rng.uniform(-1, 1, size=shape).astype(dtype)
            args.append(tvm.runtime.tensor(value, device=device))
        repeated.append(args)
    return repeated


def alloc_arguments_rpc(_session: Any, device: Any, args_info: Any, alloc_repeat: int) -> list[Any]:
    """The same for the RPC runner (``device`` is the remote device)."""
    return alloc_arguments(device, args_info, alloc_repeat)


def _progress_callback(total: int, enabled: bool) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self) -> None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="tuning", unit="trial", disable=not enabled)

        def apply(
            self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any, runner_results: Any
        ) -> None:
            self.bar.update(len(measure_candidates))

    return Progress()


def tune(
    mod: Any,
    target: Any,
    trials: int,
    work_dir: str | Path,
    *,
    rpc: tuple[str, str] | None = None,
    progress: bool = False,
    seed: int = 0,
    report: dict[str, Any] | None = None,
    threads: int | None = None,
) -> Any:
    """Tune ``mod``'s kernels; returns the JSON database in ``work_dir`` (see module docstring).
    Local measurements run on ``threads`` threads (TVM's own default when None)."""
    from tvm.s_tir import meta_schedule as ms

    work_dir = database_dir(work_dir, target, rpc)
    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # graphslim's hand-written kernels (data-dependent loops) are not MetaSchedule's to tune.
    tasks = [t for t in tasks if "graphslim.kernel" not in (t.dispatched[0]["main"].attrs or {})]
    todo = [t for t in tasks if not _has_record(database, t, target)]
    info = {
        "trials": trials,
        "tasks": len(tasks),
        "tasks_tuned": 0,
        "tasks_from_database": len(tasks) - len(todo),
        "seconds": 0.0,
        "runner": "rpc" if rpc else "local",
        **({"tracker": rpc[0], "device_key": rpc[1]} if rpc else {}),
        "database": str(work_dir),
    }
    if report is not None:
        report.update(info)
    if not todo or trials <= 0:
        return database
    if not rpc:  # measured in this process, so only for local tuning
        info["default_schedules_recorded"] = _seed_with_default_schedules(database, todo, target)
    cost_model = _cost_model()
    # MetaSchedule prints its per-task table to stdout at INFO; keep it for --debug only (its
    # full logs go to work_dir/logs either way).
    if not logging.getLogger("graphslim").isEnabledFor(logging.DEBUG):
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    builder = _builder(target)
    runner, todo = _runner(rpc, mod, target, todo, info, threads)
    contexts, weights = _tune_contexts(todo, work_dir, seed)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(trials, progress)]
    t0 = time.perf_counter()
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work_dir),
        max_trials_global=trials,
        # MetaSchedule first gives every task one round: a budget smaller than 8 per task is
        # spread over all of them instead of spent on the first (only local tuning has the
        # default schedules recorded for every task).
        num_trials_per_iter=min(64, max(1, trials // max(1, len(todo)))),
        builder=builder,
        runner=runner,
        database=database,
        cost_model=cost_model,
        measure_callbacks=callbacks,
    )
    info.update(tasks_tuned=len(todo), seconds=round(time.perf_counter() - t0, 1), cost_model=cost_model)
    if report is not None:
        report.update(info)
    return database


def _cost_model() -> str:
    """MetaSchedule's XGBoost cost model where xgboost is installed, else random."""
    try:
        import xgboost  # noqa: F401

        return "xgb"
    except ImportError:
        return "random"


def _builder(target: Any) -> Any:
    """The candidate builder: :func:`build_kernel`, and for AArch64 targets
    :func:`export_kernel_aarch64` where the cross linker is installed."""
    from tvm.s_tir import meta_schedule as ms

    aarch64 = str((getattr(target, "attrs", {}) or {}).get("mtriple", "")).startswith("aarch64")
    return ms.builder.LocalBuilder(
        f_build=build_kernel,
        f_export=export_kernel_aarch64 if aarch64 and shutil.which(AARCH64_CC) else None,
        timeout_sec=120,
    )


def _runner(
    rpc: tuple[str, str] | None, mod: Any, target: Any, todo: list[Any], info: dict[str, Any], threads: int | None
) -> tuple[Any, list[Any]]:
    """(the runner that measures candidates, the tasks to tune): local on ``threads`` threads, or
    on ``rpc``'s devices (:func:`_rpc_runner`)."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc:
        return _rpc_runner(rpc, evaluator, mod, target, todo, info)
    runner = ms.runner.LocalRunner(
        evaluator_config=evaluator,
        f_alloc_argument=alloc_arguments,
        f_run_evaluator=_evaluator(threads),
        timeout_sec=60,
    )
    return runner, todo


def _rpc_runner(
    rpc: tuple[str, str], evaluator: Any, mod: Any, target: Any, todo: list[Any], info: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """(the runner measuring on the devices of ``rpc``'s key, the tasks to tune): one
    measurement per device at a time, all devices in parallel; for a target that does not say
    its core count, the tasks are extracted again for one that says the device's. Records the
    device count (and cores) in ``info``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    host, _, port = rpc[0].rpartition(":")
    config = ms.runner.RPCConfig(
        tracker_host=host or "127.0.0.1", tracker_port=int(port), tracker_key=rpc[1], session_timeout_sec=120
    )
    devices = max(1, config.count_num_servers(allow_missing=True))
    info["devices"] = devices
    if "num-cores" not in (target.attrs or {}):
        # MetaSchedule's CPU rules need the core count, which a cross target (arm) cannot
        # know here: ask the board, and tune the tasks for a target that says it.
        cores = _device_cores(config)
        info["device_cores"] = cores
        spec = {k: v for k, v in dict(target.export()).items() if not k.startswith("feature.")}
        for derived in ("keys", "tag"):
            spec.pop(derived, None)
        names = {t.task_name for t in todo}
        cored = tvm.target.Target({**spec, "num-cores": cores})
        todo = [t for t in ms.relax_integration.extract_tasks(mod, cored) if t.task_name in names]
    runner = ms.runner.RPCRunner(
        rpc_config=config,
        evaluator_config=evaluator,
        f_alloc_argument=alloc_arguments_rpc,
        max_workers=devices,
    )
    return runner, todo


def _tune_contexts(todo: list[Any], work_dir: Path, seed: int) -> tuple[Any, Any]:
    """MetaSchedule's tune contexts and task weights for ``todo``. MetaSchedule builds its logging
    config from the names of the handlers already on its logger and fails on an unnamed one
    (pytest's capture handlers are such); they are detached for that call and put back."""
    from tvm.s_tir import meta_schedule as ms

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in ms_logger.handlers if h.get_name() is None]
    for h in unnamed:
        ms_logger.removeHandler(h)
    try:
        return ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=todo, work_dir=str(work_dir), seed=seed, num_threads="logical"
        )
    finally:
        for h in unnamed:
            ms_logger.addHandler(h)


def _device_cores(config: Any) -> int:
    """Threads the TVM runtime on a device of ``config``'s key runs with (its cores, or
    TVM_NUM_THREADS there); 1 if no device answers within the session timeout."""
    import threading

    found: list[int] = []

    def ask() -> None:
        try:
            session = config.connect_server()
            found.append(int(session.get_function("runtime.NumThreads")()))
        except Exception as e:  # noqa: BLE001 - any failure: fall back to one core
            log.warning("could not ask a device of key '%s' for its cores (%s); tuning for 1", config.tracker_key, e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(config.session_timeout_sec)
    return max(1, found[0]) if found else 1


def _evaluator(threads: int | None) -> Any:
    """The runner's evaluator: TVM's, on ``threads`` threads set through its thread-pool API in
    the worker (its pool otherwise takes TVM's default size there)."""
    if threads is None:
        return None
    import functools

    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return functools.partial(_run_on_threads, threads, run_evaluator_common)


def _run_on_threads(threads: int, evaluate: Any, rt_mod: Any, device: Any, config: Any, args: Any) -> list[float]:
    from graphslim.kernels.threadpool import configure

    configure(threads)
    return evaluate(rt_mod, device, config, args)


def _seed_with_default_schedules(database: Any, tasks: list[Any], target: Any) -> int:
    """Record graphslim's default schedule of each task, measured here, as a tuning record, so
    the database's best is never slower than the untuned build (up to timing noise)."""
    import numpy as np
    import tvm
    from graphslim.kernels.schedules import default_cpu_rules
    from tvm.s_tir import meta_schedule as ms

    rules = default_cpu_rules()
    done = 0
    for task in tasks:
        mod = task.dispatched[0]
        func = mod["main"]
        sch = None
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is not None:
                break
        if sch is None:
            continue
        sch = sch[0] if isinstance(sch, list) else sch
        try:
            lib = tvm.tirx.build(sch.mod["main"].with_attr("global_symbol", "main"), target=target)
            args_info = [info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(func)]
            args = alloc_arguments(tvm.cpu(), args_info, 1)[0]
            seconds = lib.time_evaluator("main", tvm.cpu(), number=3, repeat=3, min_repeat_ms=20)(*args).results
        except Exception as e:  # noqa: BLE001 - a remote target, or a kernel that does not build here
            if os.environ.get("GRAPHSLIM_SCHEDULE_DEBUG"):
                raise
            log.debug("default schedule of %s not measured: %s", task.task_name, e)
            continue
        workload = database.commit_workload(mod)
        database.commit_tuning_record(
            ms.database.TuningRecord(
                sch.trace, workload, [float(np.median(seconds))], target, ms.arg_info.ArgInfo.from_prim_func(func)
            )
        )
        done += 1
    return done


def _has_record(database: Any, task: Any, target: Any) -> bool:
    try:
        return bool(database.has_workload(task.dispatched[0])) and bool(
            database.query_tuning_record(task.dispatched[0], target, task.task_name)
        )
    except Exception:  # noqa: BLE001 - treat an unreadable entry as missing
        return False
