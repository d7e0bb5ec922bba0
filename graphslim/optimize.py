"""The main job as a function: load, run a pipeline, measure, write OUT_DIR atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim import __version__
from graphslim.analysis import cost_model
from graphslim.data import Dataset, load_data, random_inputs
from graphslim.errors import InputError
from graphslim.ir import (
    Graph,
    _strip_large_initializers,
    external_data_files,
    is_large,
    load_model,
    model_bytes,
    save_model,
)
from graphslim.passmanager import PassContext, PassManager
from graphslim.pipeline import Pipeline

__all__ = ["OptimizeResult", "cache_key", "optimize", "write_output_dir"]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    out_dir: Path | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    import onnx_graphsurgeon
    import onnxruntime

    return {"graphslim": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__, "numpy": numpy.__version__}


def optimize(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    pipeline: str | Pipeline | None = None,
    data: str | os.PathLike[str] | Dataset | None = None,
    train_data: str | os.PathLike[str] | Dataset | None = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    target: str | None = None,
    verify: bool = False,
    seed: int = 0,
    measure_latency: bool = True,
    progress: bool = False,
    max_accuracy_drop: float | None = None,
    min_compression: float | None = None,
    max_latency_ms: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    tune: int = 0,
    tuning_db: str | os.PathLike[str] | None = None,
    rpc: tuple[str, str] | None = None,
    shapes: dict[str, list[int]] | None = None,
) -> OptimizeResult:
    """Optimize the model at ``model_path`` and (if ``out_dir``) write ``model.onnx``,
    ``report.json`` and ``report.md`` there. The output folder is replaced whole or not at all.

    ``pipeline`` is pipeline text or a :class:`Pipeline` (default: the canonicalization set).
    Data sets are paths (see :func:`graphslim.data.load_data`) or :class:`Dataset` objects:
    ``data`` trains/calibrates and evaluates; ``train_data`` and ``eval_data`` replace it for one
    role each. With labels, accuracy is reported. Budgets (accuracy drop in points, compression
    ratio r of parameters, ORT latency in ms at batch 1) are checked after the run and reported
    under ``budgets``; the outputs are written either way.

    ``report["cache"]["key"]`` hashes everything the result depends on (model and external data
    bytes, normalized pipeline, data sets, seed, target, verify, versions). With ``cache_dir``,
    a run whose key is already there copies the stored outputs instead of running the pipeline.

    With ``target``, ``tune`` / ``tuning_db`` / ``rpc`` are passed to
    :func:`graphslim.backend.build` (MetaSchedule tuning; records in OUT_DIR/compiled/tuning/), and
    ``shapes`` (input name -> static shape) fixes symbolic input dimensions for compiling.
    """
    from graphslim.passes import DEFAULT_PIPELINE

    src = Path(model_path)
    if out_dir is not None:
        _check_out_dir(src, Path(out_dir))
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline or DEFAULT_PIPELINE)
    original = load_model(src)
    if target:  # unbound symbolic dims: the error now, not after the pipeline ran
        from graphslim.kernels.prepare import fix_shapes

        fix_shapes(original, shapes)
    model_hash = _model_sha256(src)

    def _load(d: str | os.PathLike[str] | Dataset | None) -> Dataset | None:
        return d if isinstance(d, Dataset) or d is None else load_data(d, original)

    dataset, train_set, eval_set = _load(data), _load(train_data), _load(eval_data)
    train_set = train_set or dataset
    report_set = eval_set or dataset or train_set
    target_key = f"{target}+tune{tune}" if target and tune else target
    if target and shapes:
        target_key = f"{target_key}+shapes{json.dumps(shapes, sort_keys=True)}"
    key = cache_key(model_hash, str(pipe), {"data": dataset, "train": train_set, "eval": eval_set},
                    seed=seed, target=target_key, verify=verify)
    cached = _from_cache(Path(cache_dir) / key) if cache_dir is not None else None
    if cached is not None:
        cached.report["cache"] = {"key": key, "hit": True}
        cached.report["budgets"] = _budgets(cached.report, max_accuracy_drop, min_compression, max_latency_ms)
        if out_dir is not None:
            _copy_cached(cached, Path(out_dir))
        return OptimizeResult(onnx.load(str(cached.folder / "model.onnx")), cached.report,
                              Path(out_dir) if out_dir is not None else None)

    graph = Graph.from_model(original)
    graph.infer_shapes()
    ctx = PassContext(target=target, data=train_set, eval_data=eval_set, seed=seed, verify=verify,
                      teacher=original, progress=progress)
    before = cost_model(graph)
    t0 = time.perf_counter()
    records = PassManager(pipe).run(graph, ctx)
    total = time.perf_counter() - t0
    result = graph.to_model()
    after = cost_model(graph)

    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "versions": _versions(),
        "input": {"path": str(src), "sha256": model_hash, "opset": _opset(original)},
        "output": {"model": "model.onnx", "sha256": model_digest(result)},
        "pipeline": str(pipe),
        "seed": seed,
        "target": target,
        "verify": verify,
        "seconds": round(total, 4),
        "passes": [r.to_dict() for r in records],
        "skipped": [{"pass": r.name, **s.to_dict()} for r in records for s in r.skipped],
        "before": before.to_dict(),
        "after": after.to_dict(),
        "compression": _ratios(before.to_dict(), after.to_dict()),
    }
    report.update(_quality(original, result, report_set, seed,
                           measure_latency or max_latency_ms is not None))
    compiled = (_compile(result, target, report, report_set, seed, measure_latency, tune=tune, tuning_db=tuning_db,
                         shapes=shapes,
                         rpc=rpc, progress=progress) if target else None)
    report["budgets"] = _budgets(report, max_accuracy_drop, min_compression, max_latency_ms)
    report["cache"] = {"key": key, "hit": False}
    if cache_dir is not None:
        _write(Path(cache_dir) / key, result, report, compiled)
    if out_dir is not None:
        _write(Path(out_dir), result, report, compiled)
    return OptimizeResult(result, report, Path(out_dir) if out_dir is not None else None)


def _compile(model: onnx.ModelProto, target: str, report: dict[str, Any], data: Dataset | None, seed: int,
             measure: bool, *, tune: int = 0, tuning_db: str | os.PathLike[str] | None = None,
             rpc: tuple[str, str] | None = None, progress: bool = False,
             shapes: dict[str, list[int]] | None = None) -> Callable[[Path], None]:
    """Compile the result with TVM for ``target`` (symbolic input dims fixed by ``shapes``, the
    batch to 1 otherwise); on the host, also time it. Returns the writer of OUT_DIR/compiled/."""
    import tempfile

    from graphslim.backend import build, load_artifact
    from graphslim.bench import measure_tvm

    scratch = tune > 0 and tuning_db is None
    if scratch:
        import atexit
        import shutil

        tuning_db = tempfile.mkdtemp(prefix="graphslim-tuning-")  # copied into compiled/tuning/ by export
        atexit.register(shutil.rmtree, tuning_db, True)
    export, meta = build(model, target, batch=None, shapes=shapes,
                         model_sha256=report["output"]["sha256"], tune=tune, tuning_db=tuning_db, rpc=rpc,
                         progress=progress)
    if scratch and "tuning" in meta:
        meta["tuning"]["database"] = "compiled/tuning"
    report["compiled"] = {"folder": "compiled", **meta}
    if measure and target.startswith("x86"):
        with tempfile.TemporaryDirectory(prefix="graphslim-tvm-") as tmp:
            export(Path(tmp))
            try:
                runner = load_artifact(tmp)
            except InputError as e:  # e.g. an AVX-512 build on an AVX2 host
                report["compiled"]["not_timed"] = str(e)
            else:
                sample = data if data is not None else random_inputs(_static_inputs(meta), 1, seed)
                report.setdefault("latency", None)
                report["latency"] = {**(report["latency"] or {}), "tvm_compiled": measure_tvm(runner, sample)}

    def write(folder: Path) -> None:
        (folder / "compiled").mkdir()
        export(folder / "compiled")

    return write


def _static_inputs(meta: dict[str, Any]) -> onnx.ModelProto:
    """A model stub declaring the compiled inputs (static shapes), to sample timing inputs from."""
    inputs = [onnx.helper.make_tensor_value_info(i["name"], onnx.helper.np_dtype_to_tensor_dtype(np.dtype(i["dtype"])),
                                                 i["shape"]) for i in meta["inputs"]]
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model; for models over 2 GB, of the model without its big
    weights followed by those weights' bytes (the same bytes every run)."""
    if not is_large(model):
        return _sha256(model_bytes(model))
    h = hashlib.sha256(model_bytes(_strip_large_initializers(model)))
    for init in model.graph.initializer:
        h.update(init.raw_data)
    return h.hexdigest()


def _write(folder: Path, model: onnx.ModelProto | bytes, report: dict[str, Any],
           compiled: Callable[[Path], None] | None = None) -> None:
    from graphslim.report import render_files

    if isinstance(model, bytes):
        entry: bytes | Callable[[Path], None] = model
    elif is_large(model):
        entry = lambda d: save_model(model, d / "model.onnx")  # noqa: E731 - writes model.onnx.data beside it
    else:
        entry = model_bytes(model)
    files: dict[str, bytes | Callable[[Path], None]] = {"model.onnx": entry, **render_files(report)}
    if compiled is not None:
        files["compiled"] = compiled
    write_output_dir(folder, files)


@dataclass
class _Cached:
    folder: Path
    report: dict[str, Any]


def _from_cache(entry: Path) -> _Cached | None:
    try:
        if not (entry / "model.onnx").is_file():
            return None
        return _Cached(entry, json.loads((entry / "report.json").read_text()))
    except (OSError, ValueError):
        return None


def _copy_cached(cached: _Cached, out_dir: Path) -> None:
    """The cached folder (model, weights, compiled artifact, plots) as OUT_DIR, with its report
    saying it came from the cache."""
    from graphslim.report import render_files

    def copy(folder: Path) -> None:
        for item in cached.folder.iterdir():
            if item.is_dir():
                shutil.copytree(item, folder / item.name)
            elif not item.name.startswith("report."):
                shutil.copy2(item, folder / item.name)

    files: dict[str, bytes | Callable[[Path], None]] = {"model.onnx": copy}
    files.update({k: v for k, v in render_files(cached.report).items() if k.startswith("report.")})
    write_output_dir(out_dir, files)


def _model_sha256(path: Path) -> str:
    """sha256 of the model file and, in order, the external data files it names (streamed)."""
    h = hashlib.sha256()
    for p in [path, *external_data_files(path)]:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(model_sha256: str, pipeline: str, data: dict[str, Dataset | None], *, seed: int,
              target: str | None, verify: bool) -> str:
    """What a build system can key on: same key, same outputs (model bytes and report numbers)."""
    h = hashlib.sha256()
    meta = {"model": model_sha256, "pipeline": pipeline, "seed": seed, "target": target, "verify": verify,
            "versions": _versions()}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for role in sorted(data):
        ds = data[role]
        h.update(f"|{role}:".encode())
        if ds is not None:
            ds.fingerprint(h)
    return h.hexdigest()[:32]


def _budgets(report: dict[str, Any], max_drop: float | None, max_r: float | None,
             max_ms: float | None) -> dict[str, Any]:
    """Each requested budget with its limit, measured value and whether it was met."""
    out: dict[str, Any] = {}
    if max_drop is not None:
        acc, fid = report.get("accuracy"), report.get("fidelity") or {}
        if acc:
            value, how = acc["drop_points"], "top-1 accuracy drop (points)"
        elif fid.get("top1_agreement") is not None:
            value, how = round(100 * (1 - fid["top1_agreement"]), 4), "top-1 disagreement with the original (points)"
        else:
            value, how = None, "not measurable: no labels and no classification output"
        out["max_accuracy_drop"] = {"limit": max_drop, "value": value, "measure": how,
                                    "met": value is not None and value <= max_drop}
    if max_r is not None:
        r = report["compression"]["r_params"]
        out["min_compression"] = {"limit": max_r, "value": r, "measure": "r = params after / before",
                                  "met": r is not None and r <= max_r}
    if max_ms is not None:
        lat = (report.get("latency") or {}).get("ort_compressed")
        value = lat["median_ms"] if lat else None
        out["max_latency_ms"] = {"limit": max_ms, "value": value, "measure": "ONNX Runtime, batch 1, median ms",
                                 "met": value is not None and value <= max_ms}
    return out


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    def r(key: str) -> float | None:
        return round(after[key] / before[key], 6) if before[key] else None

    return {"r_params": r("params"), "r_bytes": r("size_bytes"), "r_macs": r("macs")}


def _quality(original: onnx.ModelProto, result: onnx.ModelProto, data: Dataset | None, seed: int,
             measure_latency: bool) -> dict[str, Any]:
    """Accuracy (with labels), fidelity to the original, and ORT latency of both models."""
    from graphslim.bench import measure_ort
    from graphslim.verify import accuracy, compare_outputs, ort_session, run_model

    sample = data.take(2000) if data is not None else random_inputs(original, 8, seed)
    out: dict[str, Any] = {"accuracy": None, "fidelity": None, "latency": None}
    try:
        ref = run_model(ort_session(original), sample)
        new = run_model(ort_session(result), sample)
    except Exception as e:  # noqa: BLE001 - report, do not crash, when ORT cannot run a model
        out["fidelity"] = {"error": str(e).splitlines()[0]}
        return out
    out["fidelity"] = {"samples": len(sample), "on": "data" if data is not None else "random inputs",
                       **compare_outputs(ref, new).to_dict()}
    if data is not None and data.labels is not None:
        acc_before, acc_after = accuracy(original, sample), accuracy(result, sample)
        if acc_before is not None and acc_after is not None:
            out["accuracy"] = {"samples": len(sample), "before": acc_before, "after": acc_after,
                               "drop_points": round(100 * (acc_before - acc_after), 4)}
    if measure_latency:
        out["latency"] = {"ort_original": measure_ort(original, sample), "ort_compressed": measure_ort(result, sample)}
    return out


def _check_out_dir(src: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    try:
        src_r, out_r = src.resolve(), out.resolve()
    except OSError as e:
        raise InputError(f"{out}: {e.strerror}") from None
    if out_r == src_r.parent or out_r in src_r.parents:
        raise InputError(f"{out}: the output folder contains the input model; choose another folder")


def write_output_dir(out_dir: Path, files: dict[str, bytes | Callable[[Path], None]]) -> None:
    """Write ``files`` into ``out_dir``: everything appears at once, or nothing changes.

    A value is the file's bytes, or a function that writes the file (and any companion files,
    such as external weights) into the folder it is given.

    The files go to a temporary sibling folder first, which then replaces ``out_dir`` by rename.
    """
    out_dir = out_dir.absolute()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{parent}: cannot create output folder ({e.strerror})") from None
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.tmp-"))
    old: Path | None = None
    try:
        for name, data in files.items():
            if callable(data):
                data(tmp)
            else:
                (tmp / name).write_bytes(data)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.old-"))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.rename(old, out_dir)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
