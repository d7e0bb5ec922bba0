"""MetaSchedule tuning of a legalized, fused Relax module, with a reusable tuning database.

``tune(mod, target, trials, work_dir)`` extracts the module's kernels (fused PrimFuncs), skips
those the database in ``work_dir`` already holds records for (so build systems do not re-tune an
unchanged model), tunes the rest with ``trials`` measurements in total, and returns the
database; :func:`graphslim.kernels.pipeline.cpu_pipeline` then applies it, and graphslim's
default rules schedule whatever it does not cover.

Measurements run locally (a process pool) or, with ``rpc=("host:port", key)``, on a device
registered with a TVM RPC tracker (``python -m tvm.exec.rpc_tracker`` /
``python -m tvm.exec.rpc_server --tracker host:port --key KEY``).

What TVM 0.27's defaults get wrong here, and what this module does instead:
* the default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (20-40 s on this
  machine) and times out at 30 s: our builder calls ``tvm.tirx.build`` directly;
* the default runner fills every argument with random data, which makes index buffers
  (sparse kernels) point out of bounds: integer arguments are zero-filled;
* ``apache-tvm-ffi`` 0.1.15 crashes the JSON database (hence the pin in pyproject.toml).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["tune"]

log = logging.getLogger(__name__)


def build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule builder function: build one candidate without importing tensor intrinsics."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


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

    work_dir = Path(work_dir)
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
        "database": str(work_dir),
    }
    if report is not None:
        report.update(info)
    if not todo or trials <= 0:
        return database
    if not rpc:  # measured in this process, so only for local tuning
        info["default_schedules_recorded"] = _seed_with_default_schedules(database, todo, target)
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    # MetaSchedule prints its per-task table to stdout at INFO; keep it for --debug only (its
    # full logs go to work_dir/logs either way).
    if not logging.getLogger("graphslim").isEnabledFor(logging.DEBUG):
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    builder = ms.builder.LocalBuilder(f_build=build_kernel, timeout_sec=120)
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc:
        host, _, port = rpc[0].rpartition(":")
        runner: Any = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(
                tracker_host=host or "127.0.0.1", tracker_port=int(port), tracker_key=rpc[1], session_timeout_sec=120
            ),
            evaluator_config=evaluator,
            f_alloc_argument=alloc_arguments_rpc,
            max_workers=1,
        )
    else:
        runner = ms.runner.LocalRunner(
            evaluator_config=evaluator,
            f_alloc_argument=alloc_arguments,
            f_run_evaluator=_evaluator(threads),
            timeout_sec=60,
        )
    # MetaSchedule builds its logging config from the names of the handlers already on its logger
    # and fails on an unnamed one (pytest's capture handlers are such); they are detached for that call and put back.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in ms_logger.handlers if h.get_name() is None]
    for h in unnamed:
        ms_logger.removeHandler(h)
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=todo, work_dir=str(work_dir), seed=seed, num_threads="logical"
        )
    finally:
        for h in unnamed:
            ms_logger.addHandler(h)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(trials, progress)]
    t0 = time.perf_counter()
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work_dir),
        max_trials_global=trials,
        num_trials_per_iter=min(64, max(8, trials // max(1, len(todo)))),
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
