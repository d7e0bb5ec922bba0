"""The main job as a function: load, run a pipeline, measure, compile, write OUT_DIR atomically.

Data roles: passes train and calibrate on ``train_data`` (or ``data``); the report's accuracy and
fidelity come from samples no pass saw: ``eval_data`` if given, else a seeded ``eval_fraction`` of
``data`` held out before any pass runs (its size and origin are in ``report["data"]``). Passes
that need a validation set of their own (distill, spiral, quantize-int8's sensitivity) split it
from their training data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim.analysis import cost_model
from graphslim.core.data import Dataset, load_data, random_inputs
from graphslim.core.errors import InputError
from graphslim.core.fs import FileWriter, OutputBusy, OutputDir, scratch_dir, write_output_dir
from graphslim.core.ir import (
    Graph,
    external_data_files,
    is_large,
    load_model,
    model_bytes,
    model_file_sha256,
    save_model,
    strip_large_initializers,
)
from graphslim.core.runtime import check_memory
from graphslim.pipeline import PassContext, PassManager, PassRecord, Pipeline
from graphslim.run.cache import CacheDamaged, cache_key, copy_entry, read_entry, versions
from graphslim.run.options import DataSource, RunOptions

__all__ = ["OptimizeResult", "model_digest", "optimize"]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
_REPORT_SAMPLES = 2000  # evaluation samples the report uses at most


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns: the compressed model, its report (the report.json
    document) and the output folder it was written to (None without one)."""

    model: onnx.ModelProto
    report: dict[str, Any]
    out_dir: Path | None


@dataclass
class DataRoles:
    """The data sets of a run: what passes see and what only the report sees."""

    train: Dataset | None  # passes train and calibrate on this (PassContext.data)
    report: Dataset | None  # held out from every pass
    source: str | None  # how ``report`` was chosen, for the report
    given: dict[str, Dataset | None]  # as the caller gave them, for the cache key

    def describe(self) -> dict[str, Any] | None:
        if self.train is None and self.report is None:
            return None
        return {
            "train_samples": len(self.train) if self.train is not None else 0,
            "eval_samples": len(self.report) if self.report is not None else 0,
            "eval_source": self.source,
        }


def data_roles(model: onnx.ModelProto, opts: RunOptions) -> DataRoles:
    """Load the data sets and decide which samples the report evaluates on (see the module doc)."""

    def load(d: DataSource) -> Dataset | None:
        return d if d is None or not isinstance(d, str | Path) else load_data(d, model)

    data, train, evals = load(opts.data), load(opts.train_data), load(opts.eval_data)
    given = {"data": data, "train": train, "eval": evals}
    fit = train if train is not None else data
    if evals is not None:
        return DataRoles(fit, evals, "eval data", given)
    if train is not None and data is not None:
        return DataRoles(train, data, "data (training used train data)", given)
    if fit is None:
        return DataRoles(None, None, None, given)
    if len(fit) < 2:
        return DataRoles(fit, fit, "NOT held out: the data set has one sample", given)
    rest, held = fit.split(opts.eval_fraction, opts.seed)
    return DataRoles(
        rest, held, f"held out {len(held)} of {len(fit)} samples before any pass (seed {opts.seed})", given
    )


def optimize(
    model_path: str | Path,
    out_dir: str | Path | None = None,
    options: RunOptions | None = None,
    *,
    report_extra: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    **kwargs: Any,
) -> OptimizeResult:
    """Optimize the model at ``model_path`` and (if ``out_dir``) write ``model.onnx``,
    ``report.json``, ``report.md`` and ``report.html`` there (replaced whole or not at all).

    ``options`` is a :class:`~graphslim.run.options.RunOptions`; keyword arguments override its
    fields (``pipeline=``, ``data=``, ``verify=``, budgets such as ``max_accuracy_drop=`` and
    compile settings such as ``target=`` may be given flat). Budgets are checked after the run and
    reported under ``budgets``; the outputs are written either way.

    ``report["cache"]["key"]`` hashes everything the result depends on; with ``cache_dir`` a run
    whose key is already there copies the stored outputs instead of running the pipeline.

    ``report_extra`` adds top-level report sections (``graphslim search`` adds ``search``) and
    ``extra_files`` more files to OUT_DIR (its ``recipe.json``); a run with either neither reads
    nor stores a cache entry.
    """
    opts = RunOptions.build(options, **kwargs)
    src, out = Path(model_path), Path(out_dir) if out_dir is not None else None
    with contextlib.ExitStack() as stack:
        # Reserved first: a folder graphslim must not replace, or cannot write, is an error
        # before any work, and a second run on the same folder fails at once.
        dest = (
            stack.enter_context(OutputDir(out, "optimize", inputs=_inputs(src, opts), force=opts.force))
            if out is not None
            else None
        )
        return _optimize(src, dest, opts, stack, report_extra, extra_files)


def _inputs(src: Path, opts: RunOptions) -> list[str | os.PathLike[str]]:
    """What the run reads: the output folder may not be one of them or hold one."""
    paths: list[str | os.PathLike[str]] = [src]
    if src.is_file():
        paths += external_data_files(src)
    for d in (opts.data, opts.train_data, opts.eval_data, opts.cache_dir, opts.compile.tuning_db):
        if isinstance(d, str | os.PathLike):
            paths.append(d)
    return paths


def _optimize(
    src: Path,
    dest: OutputDir | None,
    opts: RunOptions,
    stack: contextlib.ExitStack,
    report_extra: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> OptimizeResult:
    out = dest.path if dest is not None else None
    pipe = _pipeline(opts.pipeline)
    original = load_model(src)
    if opts.compile.target:  # unbound symbolic dims: the error now, not after the pipeline ran
        from graphslim.kernels.prepare import fix_shapes

        fix_shapes(original, opts.compile.shape_map or None, opts.compile.batch)
    model_hash = model_file_sha256(src)
    roles = data_roles(original, opts)
    # Before any pass runs it (folding constants, verifying, calibrating): a model that would not
    # fit in memory at the batch sizes the run uses is refused now, with one line.
    sizes = [len(d) for d in (roles.train, roles.report) if d is not None]
    check_memory(original, batch=min(256, max(sizes, default=8)), what=str(src))
    key = _key(model_hash, pipe, roles, opts)
    if opts.cache_dir is not None and not (report_extra or extra_files):
        hit = _from_cache(Path(opts.cache_dir) / key, key, dest, opts)
        if hit is not None:
            return hit
    graph = Graph.from_model(original)
    graph.infer_shapes()
    ctx = _context(original, roles, opts)
    before = ctx.analysis(cost_model, graph)  # through the context's cache: the first pass may reuse it
    t0 = time.perf_counter()
    records = PassManager(pipe).run(graph, ctx)
    seconds = time.perf_counter() - t0
    result = graph.to_model()
    after = ctx.analysis(cost_model, graph)
    report = _report(src, model_hash, original, result, pipe, records, seconds, before.to_dict(), after.to_dict(), opts)
    report["data"] = roles.describe()
    report.update(
        _quality(
            original,
            result,
            roles.report,
            opts.seed,
            opts.measure_latency or opts.budgets.max_latency_ms is not None,
            opts.metric,
        )
    )
    compiled = _compile(result, report, roles.report, opts, stack) if opts.compile.target else None
    report["budgets"] = _budgets(report, opts)
    report["cache"] = {"key": key, "hit": False}
    files = _files(result, report, compiled)
    if opts.cache_dir is not None and not (report_extra or extra_files):
        try:  # entries are named by their key inside the cache folder, which is graphslim's
            write_output_dir(Path(opts.cache_dir) / key, files, kind="cache", inputs=_inputs(src, opts), force=True)
        except OutputBusy:
            log.info("another run is writing cache entry %s; not stored again", key)
    if report_extra:
        report.update(report_extra)
        files = _files(result, report, compiled)
    if dest is not None:
        dest.write({**files, **(extra_files or {})})
    return OptimizeResult(result, report, out)


def _pipeline(pipeline: str | Pipeline | None) -> Pipeline:
    from graphslim.passes import DEFAULT_PIPELINE

    return pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline or DEFAULT_PIPELINE)


def _key(model_hash: str, pipe: Pipeline, roles: DataRoles, opts: RunOptions) -> str:
    c = opts.compile
    target = c.target
    if target and c.tune:
        target = f"{target}+tune{c.tune}"
    extra = (
        {"shapes": [list(s) for s in c.shapes], "eval_fraction": opts.eval_fraction}
        if (c.shapes or opts.eval_fraction != 0.2)
        else None
    )
    if opts.metric != "auto":  # passes decide by the metric: a different one is a different run
        extra = {**(extra or {}), "metric": opts.metric}
    if c.target and c.rpc is not None:  # tuned and timed on that device: a run for another is not this one
        extra = {**(extra or {}), "device": {"tracker": c.rpc[0], "key": c.rpc[1]}}
    return cache_key(model_hash, str(pipe), roles.given, seed=opts.seed, target=target, verify=opts.verify, extra=extra)


def _from_cache(entry: Path, key: str, dest: OutputDir | None, opts: RunOptions) -> OptimizeResult | None:
    cached = read_entry(entry)
    if cached is None:
        return None
    cached.report["cache"] = {"key": key, "hit": True}
    cached.report["budgets"] = _budgets(cached.report, opts)
    if dest is not None:
        try:
            copy_entry(cached, dest)
        except CacheDamaged as e:
            log.warning("%s; recomputing", e)
            return None
    return OptimizeResult(onnx.load(str(cached.folder / "model.onnx")), cached.report, dest.path if dest else None)


def _context(original: onnx.ModelProto, roles: DataRoles, opts: RunOptions) -> PassContext:
    return PassContext(
        target=opts.compile.target,
        data=roles.train,
        eval_data=None,
        seed=opts.seed,
        verify=opts.verify,
        teacher=original,
        progress=opts.progress,
        metric=opts.metric,
    )


def _report(
    src: Path,
    model_hash: str,
    original: onnx.ModelProto,
    result: onnx.ModelProto,
    pipe: Pipeline,
    records: list[PassRecord],
    seconds: float,
    before: dict[str, Any],
    after: dict[str, Any],
    opts: RunOptions,
) -> dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "versions": versions(),
        "input": {"path": str(src), "sha256": model_hash, "opset": _opset(original)},
        "output": {"model": "model.onnx", "sha256": model_digest(result)},
        "pipeline": str(pipe),
        "seed": opts.seed,
        "target": opts.compile.target,
        "verify": opts.verify,
        "seconds": round(seconds, 4),
        "passes": [r.to_dict() for r in records],
        "skipped": [{"pass": r.name, **s.to_dict()} for r in records for s in r.skipped],
        "not_run": [{"pass": r.text, "reason": r.not_run} for r in records if r.not_run],
        "before": before,
        "after": after,
        "compression": _ratios(before, after),
    }


def _compile(
    model: onnx.ModelProto, report: dict[str, Any], data: Dataset | None, opts: RunOptions, stack: contextlib.ExitStack
) -> Callable[[Path], None]:
    """Compile the result with TVM for ``target``; on the host, also time it. Returns the writer
    of OUT_DIR/compiled/."""

    from graphslim.backend import build, load_artifact
    from graphslim.backend.bench import measure_tvm

    c = opts.compile
    target, tune, tuning_db = c.target, c.tune, c.tuning_db
    scratch = tune > 0 and tuning_db is None
    if scratch:  # copied into compiled/tuning/ by export; removed when the run ends
        tuning_db = str(stack.enter_context(scratch_dir("tuning")))
    export, meta = build(
        model,
        target,
        batch=1,
        model_sha256=report["output"]["sha256"],
        tune=tune,
        tuning_db=tuning_db,
        rpc=c.rpc,
        progress=opts.progress,
    )
    if scratch and "tuning" in meta:
        meta["tuning"]["database"] = "compiled/tuning"
    report["compiled"] = {"folder": "compiled", **meta}
    if opts.measure_latency and (target.startswith("x86") or c.rpc is not None):
        sample = data if data is not None else random_inputs(_static_inputs(meta), 1, opts.seed)
        with scratch_dir("tvm") as tmp:
            export(Path(tmp))
            report.setdefault("latency", None)
            if c.rpc is not None:  # on a device of the tracker (first: TVM's thread pool here would compete)
                from graphslim.backend.remote import measure_artifact

                device = measure_artifact(tmp, c.rpc, sample, wait_s=c.rpc_timeout)
                report["latency"] = {**(report["latency"] or {}), "device": device}
            if target.startswith("x86"):
                try:
                    runner = load_artifact(tmp)
                except InputError as e:  # e.g. an AVX-512 build on an AVX2 host
                    report["compiled"]["not_timed"] = str(e)
                else:
                    report["latency"] = {**(report["latency"] or {}), "tvm_compiled": measure_tvm(runner, sample)}

    def write(folder: Path) -> None:
        (folder / "compiled").mkdir()
        export(folder / "compiled")

    return write


def _static_inputs(meta: dict[str, Any]) -> onnx.ModelProto:
    """A model stub declaring the compiled inputs (static shapes), to sample timing inputs from."""
    inputs = [
        onnx.helper.make_tensor_value_info(
            i["name"], onnx.helper.np_dtype_to_tensor_dtype(np.dtype(i["dtype"])), i["shape"]
        )
        for i in meta["inputs"]
    ]
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model; for models over 2 GB, of the model without its big
    weights followed by those weights' bytes (the same bytes every run)."""
    if not is_large(model):
        return hashlib.sha256(model_bytes(model)).hexdigest()
    h = hashlib.sha256(model_bytes(strip_large_initializers(model)))
    for init in model.graph.initializer:
        h.update(init.raw_data)
    return h.hexdigest()


def _files(
    model: onnx.ModelProto | bytes, report: dict[str, Any], compiled: Callable[[Path], None] | None = None
) -> dict[str, FileWriter]:
    """The files of an output folder: the model (with its weights file when over 2 GB), the
    report in all its forms, and the compiled artifact."""
    from graphslim.report import render_files

    if isinstance(model, bytes):
        entry: FileWriter = model
    elif is_large(model):
        entry = lambda d: save_model(model, d / "model.onnx")  # noqa: E731 - writes model.onnx.data beside it
    else:
        entry = model_bytes(model)
    files: dict[str, FileWriter] = {"model.onnx": entry, **render_files(report)}
    if compiled is not None:
        files["compiled"] = compiled
    return files


def _budgets(report: dict[str, Any], opts: RunOptions) -> dict[str, Any]:
    """Each requested budget with its limit, measured value and whether it was met."""
    b = opts.budgets
    max_drop, max_r, max_ms = b.max_accuracy_drop, b.min_compression, b.max_latency_ms
    out: dict[str, Any] = {}
    if max_drop is not None:
        acc, met = report.get("accuracy"), report.get("metric")
        if acc:
            value, how = acc["drop_points"], "top-1 accuracy drop (points)"
        elif met:
            # Without labels, points of the model's own metric (1 point of cosine = 0.01).
            value, how = met["drop_points"], f"points of {met['name']} lost: {met['description']}"
        else:
            value, how = None, "not measurable: the models could not be compared"
        out["max_accuracy_drop"] = {
            "limit": max_drop,
            "value": value,
            "measure": how,
            "met": value is not None and value <= max_drop,
        }
    if max_r is not None:
        r = report["compression"]["r_params"]
        out["min_compression"] = {
            "limit": max_r,
            "value": r,
            "measure": "r = params after / before",
            "met": r is not None and r <= max_r,
        }
    if max_ms is not None:
        lat = (report.get("latency") or {}).get("ort_compressed")
        value = lat["median_ms"] if lat else None
        out["max_latency_ms"] = {
            "limit": max_ms,
            "value": value,
            "measure": "ONNX Runtime, batch 1, median ms",
            "met": value is not None and value <= max_ms,
        }
    return out


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    def r(key: str) -> float | None:
        return round(after[key] / before[key], 6) if before[key] else None

    return {"r_params": r("params"), "r_bytes": r("size_bytes"), "r_macs": r("macs")}


def _quality(
    original: onnx.ModelProto,
    result: onnx.ModelProto,
    data: Dataset | None,
    seed: int,
    measure_latency: bool,
    metric: str = "auto",
) -> dict[str, Any]:
    """Accuracy (with labels), the model's metric and fidelity to the original, and ORT latency
    of both models. ``metric`` is :mod:`graphslim.core.metrics`' choice for the first output."""
    from graphslim.backend.bench import measure_ort
    from graphslim.core.metrics import Evaluator, compare_outputs
    from graphslim.core.runtime import ort_session, run_model

    sample = data.take(_REPORT_SAMPLES) if data is not None else random_inputs(original, 8, seed)
    on = "data" if data is not None else "random inputs"
    out: dict[str, Any] = {"accuracy": None, "fidelity": None, "metric": None, "latency": None}
    try:
        ref = run_model(ort_session(original), sample)
        new = run_model(ort_session(result), sample)
    except Exception as e:  # noqa: BLE001 - report, do not crash, when ORT cannot run a model
        out["fidelity"] = {"error": str(e).splitlines()[0]}
        return out
    try:
        fid = compare_outputs(ref, new)
        ev = Evaluator(original, sample, metric=metric, reference_outputs=ref)
        score = ev.score_outputs(new)
    except (ValueError, InputError) as e:
        out["fidelity"] = {"error": str(e).splitlines()[0]}
        return out
    out["fidelity"] = {"samples": len(sample), "on": on, **fid.to_dict()}
    out["metric"] = {
        **ev.spec.to_dict(),
        "samples": len(sample),
        "on": on,
        "before": round(ev.reference_value, 6),
        "after": round(score.value, 6),
        "drop_points": round(ev.drop_points(score), 4),
        "details": score.details,
    }
    if ev.spec.name == "accuracy":
        out["accuracy"] = {
            "samples": len(sample),
            "before": ev.reference_value,
            "after": score.value,
            "drop_points": round(ev.drop_points(score), 4),
        }
    if measure_latency:
        out["latency"] = {"ort_original": measure_ort(original, sample), "ort_compressed": measure_ort(result, sample)}
    return out
