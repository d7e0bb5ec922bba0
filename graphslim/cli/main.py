"""The ``graphslim`` command line.

Exit codes: 0 success; 1 internal error; 2 bad input or usage (unreadable or invalid model,
unknown pass or option, bad data file); 3 a budget was missed (outputs are still written); 4 a
pass could not run at all (outputs are still written, the reason is on stderr and in the report).
Errors print one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphslim.core.errors import EXIT_BUDGET, EXIT_INTERNAL, EXIT_NOT_RUN, EXIT_OK, GraphslimError, InputError
from graphslim.core.fs import private_tmpdir, remove_scratch
from graphslim.core.version import __version__

__all__ = ["main"]

log = logging.getLogger("graphslim")

EPILOG = """exit codes: 0 success, 1 internal error, 2 bad input or usage, 3 budget missed, 4 a pass could not run"""
METRIC_CHOICES = ("auto", "accuracy", "agreement", "pooled_cosine", "cosine", "mse")
TARGET_CHOICES = ("x86", "x86-avx2", "x86-avx512", "x86-avx512-vnni", "arm", "arm64-neon", "arm64-dot", "cuda")


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        help="bind an input's symbolic dims, e.g. input_ids=1x128 (repeatable; unbound symbolic dims count as 1)",
    )


def _add_threads(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"{what} (default: see README, 'Threads': the artifact's, else TVM_NUM_THREADS if set, "
        "else one thread for small models and every CPU for large ones)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)")
    # Also accepted after the command; SUPPRESS keeps the global value when not given here.
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors (and --json output)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show progress logs and the raw warnings of ONNX Runtime and TVM",
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")


FORCE_HELP = (
    "replace OUT_DIR even if graphslim did not write it (or wrote another kind of output there); "
    "never an input's folder, a link or the current folder"
)


def _parser() -> argparse.ArgumentParser:
    """The command-line parser: global flags and every command's options.

    Long: a flat listing of argparse calls, one per option of each command (search's are in
    :func:`_add_search`), read like the --help text it produces; splitting it would scatter
    options that are documented together."""
    ap = argparse.ArgumentParser(
        prog="graphslim",
        description="Compress and compile ONNX models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"graphslim {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (and --json output)")
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show progress logs and the raw warnings of ONNX Runtime and TVM",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    o = sub.add_parser("optimize", help="run a pass pipeline on a model and write OUT_DIR", epilog=EPILOG)
    o.add_argument("model", help="input .onnx file (never modified)")
    o.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_DIR",
        help="output folder: model.onnx, report.json, report.md (replaced whole, atomically; only a folder "
        "graphslim wrote, unless --force)",
    )
    o.add_argument("--force", action="store_true", help=FORCE_HELP)
    g = o.add_mutually_exclusive_group()
    g.add_argument(
        "--passes", metavar="PIPELINE", help="pipeline text, e.g. 'fold-batchnorm,prune-channels{ratio=0.5}'"
    )
    g.add_argument("--recipe", metavar="FILE", help="pipeline as a JSON or YAML recipe file")
    o.add_argument(
        "--data",
        metavar="DATA",
        help="data set: FILE.npz (arrays named after the model inputs, optional "
        "'labels'), a folder of .npz shards, or module:function returning batches",
    )
    o.add_argument("--train-data", metavar="DATA", help="data for training/calibration, if not --data")
    o.add_argument("--eval-data", metavar="DATA", help="held-out data for evaluation and the report, if not --data")
    o.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="budget: exit 3 if top-1 accuracy falls by more points (without labels: points of the model's "
        "metric, e.g. 100 x the loss of pooled cosine to the original)",
    )
    o.add_argument(
        "--metric",
        choices=METRIC_CHOICES,
        default="auto",
        help="how outputs are judged by passes, the budget and the report (default auto: accuracy with labels, "
        "agreement for logits, mask-pooled cosine for hidden states, cosine otherwise)",
    )
    o.add_argument(
        "--min-compression",
        type=float,
        metavar="R",
        help="budget: exit 3 unless r = params after / before is at most R",
    )
    o.add_argument(
        "--max-latency-ms",
        type=float,
        metavar="MS",
        help="budget: exit 3 if the result's ONNX Runtime latency (batch 1, median) is above MS",
    )
    o.add_argument(
        "--target", choices=TARGET_CHOICES, help="also compile the result with TVM into OUT_DIR/compiled/ (extra: tvm)"
    )
    _add_shape(o)
    _add_tuning(o)
    _add_threads(o, "threads the compiled result runs (and is timed) with, recorded in compiled/artifact.json")
    o.add_argument(
        "--verify", action="store_true", help="check every pass: valid ONNX, runs in ORT, exact passes exact"
    )
    o.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")
    o.add_argument("--print-pipeline", action="store_true", help="print the normalized pipeline and exit")
    o.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="reuse the outputs of an earlier run with the same cache key "
        "(model, pipeline, data, seed, target, versions); report.json records the key",
    )
    o.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency measurement")
    _add_common(o)

    i = sub.add_parser("inspect", help="parameters, MACs, size, sparsity per layer")
    i.add_argument("model")
    i.add_argument("--layers", action="store_true", help="print the per-layer table")
    i.add_argument("--groups", action="store_true", help="print the channel dependency groups (what prunes together)")
    _add_shape(i)
    _add_common(i)

    p = sub.add_parser("passes", help="list the registered passes with their options")
    _add_common(p)

    r = sub.add_parser("report", help="re-render report.md, report.html and the plots from OUT_DIR/report.json")
    r.add_argument("folder", metavar="OUT_DIR")
    _add_common(r)

    c = sub.add_parser("compare", help="several runs in one table and one accuracy-vs-r plot")
    c.add_argument("folders", nargs="+", metavar="OUT_DIR")
    c.add_argument("-o", "--output", metavar="DIR", help="also write compare.md, compare.html and compare.png here")
    c.add_argument("--force", action="store_true", help=FORCE_HELP.replace("OUT_DIR", "DIR"))
    _add_common(c)

    k = sub.add_parser("compile", help="compile a model with TVM for x86, ARM or CUDA (extra: tvm)")
    k.add_argument("model")
    k.add_argument("--target", required=True, choices=TARGET_CHOICES)
    k.add_argument(
        "--batch",
        type=int,
        help="static batch size: symbolic leading dimensions (default: as --shape gives them, else 1)",
    )
    k.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_DIR",
        help="model.so (or .tar), params.bin (the weights) and artifact.json",
    )
    k.add_argument("--force", action="store_true", help=FORCE_HELP)
    _add_shape(k)
    _add_tuning(k)
    _add_threads(k, "threads the artifact runs (and tuning measures) with, recorded in artifact.json")
    _add_common(k)

    rn = sub.add_parser("run", help="run a compiled artifact on data (accuracy where labels exist)")
    rn.add_argument("artifact", metavar="ARTIFACT_DIR")
    rn.add_argument("--data", required=True, metavar="DATA")
    rn.add_argument("--reference", metavar="MODEL", help="compare outputs with this ONNX model in ONNX Runtime")
    _add_rpc(rn)
    _add_threads(rn, "TVM threads")
    _add_common(rn)

    bn = sub.add_parser("bench", help="latency of an ONNX model (ONNX Runtime) or a compiled artifact (TVM)")
    bn.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    bn.add_argument(
        "--baseline",
        metavar="MODEL",
        help="also time this ONNX model (ONNX Runtime), interleaved with MODEL in rounds on the same inputs; "
        "vs_baseline is the median of the per-round ratios",
    )
    bn.add_argument(
        "--batch", default="1,32", help="batch sizes for ONNX models (default 1,32); artifacts use their compiled batch"
    )
    bn.add_argument("--data", metavar="DATA", help="inputs to time with (default: seeded random inputs)")
    _add_shape(bn)
    bn.add_argument("--warmup", type=int, default=10)
    bn.add_argument("--repeat", type=int, default=100, help="timed runs per model and batch (default 100)")
    bn.add_argument(
        "--rounds", type=int, default=7, help="rounds the timed runs are split into, alternating the models (default 7)"
    )
    _add_threads(bn, "threads for TVM and ONNX Runtime alike (default: TVM as for run, ONNX Runtime its own)")
    bn.add_argument(
        "--target",
        choices=TARGET_CHOICES,
        help="with --rpc-tracker: build an ONNX MODEL for this target (per --batch) and time it on the device",
    )
    _add_rpc(bn)
    _add_common(bn)

    _add_search(sub)

    dv = sub.add_parser("devices", help="list the devices a TVM RPC tracker has (keys, free / in use)")
    dv.add_argument("--rpc-tracker", required=True, metavar="HOST:PORT", help="the tracker's address")
    _add_common(dv)

    e = sub.add_parser("eval", help="top-1 accuracy on labelled data, and the model's metric against a reference model")
    e.add_argument("model")
    e.add_argument("--data", required=True, metavar="DATA", help="FILE.npz, a folder of shards, or module:function")
    e.add_argument("--reference", metavar="MODEL", help="compare outputs with this model (e.g. the teacher)")
    e.add_argument(
        "--metric",
        choices=METRIC_CHOICES,
        default="auto",
        help="how outputs are compared with --reference (default auto, as in optimize)",
    )
    _add_common(e)
    return ap


def _add_search(sub: Any) -> None:
    """The ``search`` command's parser.

    Long: a flat listing of argparse calls, one per option of ``search``, read like the --help
    text it produces."""
    s = sub.add_parser(
        "search",
        help="search per-layer pruning, low-rank, int8 (and block sparsity) for the fastest model within a budget",
        description="Search the per-layer knobs that apply to MODEL (channel/head keep ratios, SVD ranks, int8 or "
        "float, block sparsity with --target) for the fastest (or smallest) model within the budgets, measured on "
        "held-out data. Writes OUT_DIR/model.onnx, report.json (with a 'search' section: trials and the Pareto "
        "front), report.md/html (front plotted) and recipe.json, which 'graphslim optimize MODEL --recipe' turns "
        "into the same model. Needs the 'search' extra (Optuna).",
        epilog=EPILOG,
    )
    s.add_argument("model", help="input .onnx file (never modified)")
    s.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_DIR",
        help="output folder, as for optimize (--force to replace one graphslim did not write)",
    )
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.add_argument("--data", metavar="DATA", help="data set, as for optimize (a seeded 20%% is held out)")
    s.add_argument("--train-data", metavar="DATA", help="data the passes calibrate on (int8, activation ranking)")
    s.add_argument("--eval-data", metavar="DATA", help="held-out data every candidate is measured on")
    s.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="budget: points of top-1 accuracy (or of the model's metric) the result may lose (default 1.0)",
    )
    s.add_argument("--min-compression", type=float, metavar="R", help="budget: r = params after / before at most R")
    s.add_argument(
        "--max-latency-ms", type=float, metavar="MS", help="budget: latency (batch 1) at most MS on the runtime timed"
    )
    s.add_argument(
        "--objective",
        choices=("latency", "bytes", "macs"),
        default="latency",
        help="what to minimize within the budgets (default latency: measured on the target)",
    )
    s.add_argument(
        "--target",
        choices=TARGET_CHOICES,
        help="time candidates with TVM for this target (default: ONNX Runtime) and compile the result "
        "into OUT_DIR/compiled/ (extra: tvm); adds block-sparsity knobs",
    )
    s.add_argument("--trials", type=int, default=100, help="full evaluations in the study, all workers (default 100)")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="stop each worker's trials after this long")
    s.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage of the study (default sqlite:///OUT_DIR.search/study.db; a database URL to share "
        "it between machines)",
    )
    s.add_argument("--study", metavar="NAME", help="study name (default: derived from the model, data and options)")
    s.add_argument("--resume", action="store_true", help="continue an existing study (an error if there is none)")
    s.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes on this machine sharing the study"
    )
    s.add_argument(
        "--techniques",
        default="prune,heads,svd,int8,sparse",
        metavar="LIST",
        help="knob families to search, comma-separated (default prune,heads,svd,int8,sparse; sparse only with --target)",
    )
    s.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe", help="Optuna sampler (default tpe)")
    _add_rpc(s)  # latency measured on a device of the tracker (with --target)
    s.add_argument(
        "--sensitivity-samples",
        type=int,
        default=500,
        metavar="N",
        help="held-out samples for the one-knob-at-a-time pass (default 500)",
    )
    s.add_argument(
        "--validate",
        type=int,
        default=8,
        metavar="K",
        help="the K best candidates within the budgets (by estimate) timed end to end before choosing (default 8)",
    )
    s.add_argument("--batch", type=int, default=1, help="batch size latency is timed at (default 1)")
    s.add_argument("--threads", type=int, metavar="N", help="runtime threads when timing (default: the runtime's)")
    s.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time by the wall clock (default) or by single-thread CPU time, which other processes on a shared "
        "machine do not disturb",
    )
    s.add_argument("--seed", type=int, default=0, help="seed for the sampler and every pass (default 0)")
    _add_common(s)


def _cmd_search(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend.options import CompileOptions
    from graphslim.run.options import Budgets, RunOptions, SearchOptions
    from graphslim.run.search import require_optuna, search

    require_optuna()  # exit 2 naming the extra, before any work
    run = RunOptions(
        data=args.data,
        train_data=args.train_data,
        eval_data=args.eval_data,
        seed=args.seed,
        progress=not (args.quiet or args.json),
        budgets=Budgets(args.max_accuracy_drop, args.min_compression, args.max_latency_ms),
        compile=CompileOptions(target=args.target, rpc=_rpc_of(args), rpc_timeout=args.rpc_timeout),
        force=args.force,
    )
    opts = SearchOptions(
        run=run,
        objective=args.objective,
        trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        study=args.study,
        resume=args.resume,
        workers=args.workers,
        techniques=tuple(t.strip() for t in args.techniques.split(",") if t.strip()),
        sampler=args.sampler,
        sensitivity_samples=args.sensitivity_samples,
        validate=args.validate,
        batch=args.batch,
        threads=args.threads,
        clock=args.clock,
    )
    res = search(args.model, args.output, opts)
    rep = res.report
    missed = [
        f"{name}: {b['measure']} = {b['value']}, limit {b['limit']}"
        for name, b in rep["budgets"].items()
        if not b["met"]
    ]
    for m in missed:
        print(f"graphslim: budget missed: {m} (outputs written to {args.output})", file=sys.stderr)
    code = EXIT_BUDGET if missed else EXIT_OK
    if args.json:
        return code, rep
    return code, _search_text(args, rep)


def _search_text(args: argparse.Namespace, rep: dict[str, Any]) -> str:
    """search's summary for people: the study, the chosen trial and how to reproduce it."""
    sec = rep["search"]
    chosen = sec["chosen"]
    lat = (rep.get("latency") or {}).get("ort_compressed")
    lines = [
        f"wrote {Path(args.output) / 'model.onnx'}, recipe.json, report.json and report.html",
        f"  study {sec['study']['name']}: {sec['trials']} trials ({sec['evaluations']} evaluated, "
        f"{sec['sensitivity']['evaluations']} sensitivity candidates), {len(sec['front'])} on the Pareto front",
        f"  chosen: trial {chosen['trial']}, {sec['metric'].get('description') or sec['metric']['name']} {chosen['accuracy']:.4f} "
        f"(drop {chosen['drop_points']} points), {chosen['bytes']:,} bytes, {chosen['macs']:,} MACs"
        + (
            f", {chosen['latency_ms']} ms ({chosen['latency_source']}, {sec['runtime']})"
            if chosen["latency_ms"]
            else ""
        ),
        f"  pipeline: {chosen['pipeline']}",
    ]
    if lat:
        lines.append(f"  ONNX Runtime batch 1: {rep['latency']['ort_original']['median_ms']} -> {lat['median_ms']} ms")
    lines.append(f"  reproduce: {sec['reproduce']}")
    return "\n".join(lines)


def _pipeline_from_args(args: argparse.Namespace):
    from graphslim.passes import DEFAULT_PIPELINE
    from graphslim.pipeline import Pipeline

    if args.recipe:
        return Pipeline.from_recipe(args.recipe)
    return Pipeline.parse(args.passes if args.passes is not None else DEFAULT_PIPELINE)


def _cmd_optimize(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.run import optimize
    from graphslim.run.options import Budgets, RunOptions

    pipeline = _pipeline_from_args(args)  # usage errors before any work
    if args.print_pipeline:
        return EXIT_OK, {"pipeline": str(pipeline)} if args.json else str(pipeline)
    opts = RunOptions(
        pipeline=pipeline,
        data=args.data,
        train_data=args.train_data,
        eval_data=args.eval_data,
        verify=args.verify,
        seed=args.seed,
        metric=args.metric,
        measure_latency=not args.no_latency,
        progress=not (args.quiet or args.json),
        cache_dir=args.cache_dir,
        force=args.force,
        budgets=Budgets(args.max_accuracy_drop, args.min_compression, args.max_latency_ms),
        compile=_compile_options(args, target=args.target, batch=None),
    )
    res = optimize(args.model, args.output, opts)
    rep = res.report
    missed = [
        f"{name}: {b['measure']} = {b['value']}, limit {b['limit']}"
        for name, b in rep["budgets"].items()
        if not b["met"]
    ]
    code = EXIT_BUDGET if missed else EXIT_OK
    for m in missed:
        print(f"graphslim: budget missed: {m} (outputs written to {args.output})", file=sys.stderr)
    for nr in rep.get("not_run", []):
        print(f"graphslim: {nr['pass']} did not run: {nr['reason']}", file=sys.stderr)
        code = EXIT_NOT_RUN if code == EXIT_OK else code
    if args.json:
        return code, rep
    c, b, a = rep["compression"], rep["before"], rep["after"]
    lines = [
        f"wrote {Path(args.output) / 'model.onnx'}, report.json and report.html",
        f"  params {b['params']:,} -> {a['params']:,} (r = {c['r_params']})",
        f"  MACs   {b['macs']:,} -> {a['macs']:,}",
        f"  bytes  {b['size_bytes']:,} -> {a['size_bytes']:,}",
    ]
    met = rep.get("metric")
    if met:
        held = (rep.get("data") or {}).get("eval_source") or "the data"
        lines.append(
            f"  {met['name']} {met['before']:.4f} -> {met['after']:.4f} ({met['samples']} samples; {held}; "
            f"{met['drop_points']:+.2f} points lost)"
        )
    lines += _latency_lines(rep)
    for r in rep["passes"]:
        if r.get("not_run"):
            lines.append(f"  {r['pipeline']}: did not run: {r['not_run']}")
            continue
        scalars = ", ".join(f"{k}={v}" for k, v in r["stats"].items() if not isinstance(v, list | dict))
        lines.append(f"  {r['pipeline']}: {'changed' if r['changed'] else 'no change'} ({scalars})")
    if rep["skipped"]:
        lines.append(f"  left unchanged: {len(rep['skipped'])} part(s), reasons in report.md")
    return code, "\n".join(lines)


def _latency_lines(rep: dict[str, Any]) -> list[str]:
    """Batch-1 medians: ONNX Runtime on the original and the result, the compiled artifact, each
    with its speed-up over ONNX Runtime on the original."""
    lat = rep.get("latency") or {}
    base = (lat.get("ort_original") or {}).get("median_ms")
    rows = [
        ("ONNX Runtime, original", lat.get("ort_original")),
        ("ONNX Runtime, result", lat.get("ort_compressed")),
        (f"TVM {rep.get('target')}, compiled result", lat.get("tvm_compiled")),
        (f"device '{(lat.get('device') or {}).get('key')}', compiled result", lat.get("device")),
    ]
    out = []
    for label, row in rows:
        if row and row.get("median_ms"):
            speed = f" ({base / row['median_ms']:.2f}x)" if base else ""
            out.append(f"  latency {label}: {row['median_ms']:.4f} ms{speed}")
    not_timed = (rep.get("compiled") or {}).get("not_timed")
    if not_timed:
        out.append(f"  compiled result not timed: {not_timed}")
    return out


def _cmd_eval(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.core.data import load_data
    from graphslim.core.ir import load_model
    from graphslim.core.metrics import Evaluator, accuracy, compare_outputs
    from graphslim.core.runtime import check_memory, ort_session, run_model

    model = load_model(args.model)
    data = load_data(args.data, model)
    check_memory(model, batch=min(256, len(data)), what=args.model)
    out: dict[str, Any] = {"model": args.model, "samples": len(data), "accuracy": accuracy(model, data)}
    if args.reference:
        ref = load_model(args.reference)
        check_memory(ref, batch=min(256, len(data)), what=args.reference)
        try:
            ref_out = run_model(ort_session(ref), data)
            new_out = run_model(ort_session(model), data)
            fid = compare_outputs(ref_out, new_out)
            ev = Evaluator(ref, data, metric=args.metric, reference_outputs=ref_out)
            score = ev.score_outputs(new_out)
        except ValueError as e:
            raise InputError(f"cannot compare with the reference: {e}") from None
        out["fidelity"] = fid.to_dict()
        out["reference_accuracy"] = accuracy(ref, data)
        out["metric"] = {
            **ev.spec.to_dict(),
            "reference": ev.reference_value,
            "value": score.value,
            "drop_points": round(ev.drop_points(score), 4),
            "details": score.details,
        }
    if out["accuracy"] is None and not args.reference:
        raise InputError(f"{args.data}: no labels to compute accuracy; give --reference MODEL to measure fidelity")
    if args.json:
        return EXIT_OK, out
    lines = [f"{args.model} on {len(data)} samples"]
    if out["accuracy"] is not None:
        lines.append(f"  top-1 accuracy {out['accuracy']:.4f}")
    if args.reference:
        f, m = out["fidelity"], out["metric"]
        lines.append(f"  vs {args.reference}: {m['name']} {m['value']:.6f} ({m['description']})")
        lines.append(
            f"  top-1 agreement {f['top1_agreement']}, cosine {f['cosine']:.6f}, max abs diff {f['max_abs_diff']:.4g}"
        )
    return EXIT_OK, "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.analysis.channels import channel_groups
    from graphslim.analysis.cost import bind_dims, cost_by_type, cost_model
    from graphslim.backend.options import parse_shapes
    from graphslim.core.ir import Graph, load_model

    shapes = dict(parse_shapes(args.shape))
    graph = Graph.from_model(load_model(args.model))
    graph.infer_shapes()
    try:
        bindings = bind_dims(graph, shapes)
    except ValueError as e:
        raise InputError(str(e)) from None
    rep = cost_model(graph, bindings=bindings)
    analysis = channel_groups(graph)
    types = analysis.layer_types(graph)
    by_type = cost_by_type(graph, rep, types) if types else None
    groups = analysis.describe() if args.groups else None
    if args.json:
        d = rep.to_dict()
        if by_type is not None:
            d["by_type"] = by_type
        if groups is not None:
            d["groups"] = groups
        return EXIT_OK, d
    lines = [
        f"{args.model}: {rep.nodes} nodes, {rep.params:,} parameters, {rep.macs:,} MACs, "
        f"{rep.size_bytes:,} bytes, weight sparsity {rep.sparsity:.2%}",
        "  inputs:  " + ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in rep.inputs),
        "  outputs: " + ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in rep.outputs),
        "  ops:     " + ", ".join(f"{k} {v}" for k, v in rep.op_counts.items()),
    ]
    if rep.bindings:
        given = {d for t in graph.inputs if t.name in shapes for d in graph.shape(t) or () if isinstance(d, str)}
        lines.append(
            "  counted for: "
            + ", ".join(f"{k}={v}" + ("" if k in given else " (default)") for k, v in rep.bindings.items())
        )
    if by_type:
        lines.append(f"  {'by type':<12} {'params':>12} {'MACs':>16} {'bytes':>14}")
        for kind, row in by_type.items():
            lines.append(f"  {kind:<12} {row['params']:>12,} {row['macs']:>16,} {row['bytes']:>14,}")
    if args.layers:
        lines += _layer_lines(rep)
    if groups is not None:
        lines += _group_lines(groups)
    return EXIT_OK, "\n".join(lines)


def _layer_lines(rep: Any) -> list[str]:
    """inspect --layers: one line per layer with parameters or MACs."""
    lines = []
    lines.append(f"  {'layer':<32} {'op':<20} {'params':>10} {'MACs':>14} {'sparsity':>9}  block sparsity")
    for lc in rep.layers:
        if lc.params or lc.macs:
            blocks = " ".join(f"{k}:{v:.0%}" for k, v in lc.extra.get("block_sparsity", {}).items())
            lines.append(
                f"  {lc.name[:32]:<32} {lc.op:<20} {lc.params:>10,} {lc.macs:>14,} {lc.sparsity:>9.2%}  {blocks}"
            )
    return lines


def _group_lines(groups: list[dict[str, Any]]) -> list[str]:
    """inspect --groups: each channel group, prunable or why not, and its members' uses."""
    lines = []
    n_ok = sum(1 for grp in groups if grp["prunable"])
    lines.append(f"  channel groups: {len(groups)}, prunable: {n_ok}")
    for grp in groups:
        roots = ", ".join(m["root"] for m in grp["members"])
        state = (
            f"prunable ({grp['channels']} channels)" if grp["prunable"] else "frozen: " + "; ".join(grp["why_not"][:2])
        )
        lines.append(f"  group {grp['group']:>3}: [{roots}] {state}")
        for m in grp["members"]:
            lines.append(f"      {m['root']}: {', '.join(m['uses'])}")
    return lines


def _describe_options(cls: type) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(cls.Options)
    out = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(
            {
                "name": f.name,
                "type": str(hints[f.name]).replace("typing.", ""),
                "default": list(default) if isinstance(default, tuple) else default,
            }
        )
    return out


def _cmd_passes(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.pipeline import registered_passes
    from graphslim.pipeline.options import format_value

    items = []
    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        items.append({"name": name, "exact": cls.exact, "doc": doc, "options": _describe_options(cls)})
    if args.json:
        return EXIT_OK, {"passes": items}
    lines = []
    for it in items:
        # Pipeline syntax (true, none, [a,b], quoted strings): a line pastes back as a pass.
        opts = ",".join(f"{o['name']}={format_value(o['default'])}" for o in it["options"])
        lines.append(f"{it['name']}{{{opts}}}" if opts else it["name"])
        lines.append("    " + it["doc"].splitlines()[0] if it["doc"] else "")
    return EXIT_OK, "\n".join(lines)


def _add_tuning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tuning (CPU targets)")
    g.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="TRIALS",
        help="MetaSchedule trials in total over the model's kernels (default 0: graphslim's default "
        "schedules); records go to OUT_DIR[/compiled]/tuning/",
    )
    g.add_argument(
        "--tuning-db",
        metavar="DIR",
        help="tuning database folder to reuse and extend across builds "
        "(kernels it already holds are not tuned again; with --tune 0 its records are only applied)",
    )
    _add_rpc(p)


def _add_rpc(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote device (TVM RPC tracker; see 'graphslim devices')")
    g.add_argument(
        "--rpc-tracker",
        metavar="HOST:PORT",
        help="use a device registered with this TVM RPC tracker: tuning measures there (needed to tune a "
        "cross-compiled target such as arm), and the compiled model is run and timed there",
    )
    g.add_argument("--rpc-key", metavar="KEY", help="device key the boards registered with at the tracker")
    g.add_argument(
        "--rpc-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for a free device of the key before failing (default 60)",
    )


def _compile_options(args: argparse.Namespace, *, target: str | None, batch: int | None = None) -> Any:
    """The CompileOptions of a command's --shape and tuning flags (validated here: usage errors
    before work)."""
    from graphslim.backend.options import CompileOptions, parse_shapes

    rpc = _rpc_of(args)
    if rpc is not None and target is None:
        raise InputError("--rpc-tracker/--rpc-key run the compiled result on a device: give --target too")
    return CompileOptions(
        target=target,
        shapes=parse_shapes(getattr(args, "shape", None)),
        batch=batch,
        tune=args.tune,
        tuning_db=args.tuning_db,
        rpc=rpc,
        rpc_timeout=args.rpc_timeout,
        threads=getattr(args, "threads", None),
    )


def _rpc_of(args: argparse.Namespace) -> tuple[str, str] | None:
    """(tracker, key) of --rpc-tracker/--rpc-key, or None; usage errors before any work."""
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise InputError("--rpc-tracker and --rpc-key go together")
    if args.rpc_tracker and not re.fullmatch(r"[^:\s]+:\d+", args.rpc_tracker):
        raise InputError(f"--rpc-tracker: expected HOST:PORT, got {args.rpc_tracker!r}")
    if not args.rpc_timeout > 0:
        raise InputError("--rpc-timeout must be > 0")
    return (args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None


def _cmd_compile(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend import compile_model
    from graphslim.core.fs import OutputDir
    from graphslim.core.ir import external_data_files, load_model, model_file_sha256
    from graphslim.core.runtime import check_memory

    c = _compile_options(args, target=args.target, batch=args.batch)
    if args.batch is not None and not 1 <= args.batch <= 2**20:
        raise InputError(f"--batch must be from 1 to 1048576, got {args.batch}")
    src = Path(args.model)
    inputs = [src, *(external_data_files(src) if src.is_file() else []), c.tuning_db]
    # Reserved before the work: a folder graphslim must not replace, or cannot write, fails now.
    with OutputDir(args.output, "compile", inputs=inputs, force=args.force):
        model = load_model(src)
        check_memory(model, batch=args.batch or 1, what=args.model)  # TVM folds constants too
        art = compile_model(
            model,
            c.target,
            Path(args.output),
            batch=c.batch,
            shapes={k: list(v) for k, v in c.shapes} or None,
            model_sha256=model_file_sha256(src),
            tune=c.tune,
            tuning_db=c.tuning_db,
            rpc=c.rpc,
            progress=not (args.quiet or args.json),
            threads=c.threads,
        )
    if args.json:
        return EXIT_OK, art.meta
    return (
        EXIT_OK,
        f"compiled {args.model} for {args.target} (batch {art.meta['batch']}) -> {art.folder / art.meta['library']}",
    )


def _cmd_run(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend import load_artifact
    from graphslim.core.data import load_data
    from graphslim.core.ir import load_model
    from graphslim.core.metrics import MetricSpec, compare_outputs, score_outputs
    from graphslim.core.runtime import check_memory, run_model

    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1")
    rpc = _rpc_of(args)
    if rpc is not None:  # on a device of the tracker: the library is uploaded there
        from graphslim.backend.remote import read_meta

        runner, meta = None, read_meta(args.artifact)
    else:
        runner = load_artifact(args.artifact, threads=args.threads)
        meta = runner.meta
    batch = meta["batch"]
    names = [i["name"] for i in meta["inputs"]]
    ref_model = load_model(args.reference) if args.reference else None
    if ref_model is not None:
        check_memory(ref_model, batch=256, what=args.reference)
    # The artifact has a static batch: feed it whole batches (the tail is padded, then cut).
    template = ref_model or _model_for_inputs(meta)
    data = load_data(args.data, template)
    feeds_list, sizes = _padded_batches(data, batch, names)
    if runner is None:
        from graphslim.backend.remote import run_artifact

        raw = run_artifact(args.artifact, rpc, feeds_list, wait_s=args.rpc_timeout)
    else:
        raw = [runner(f) for f in feeds_list]
    outs = [[o[:n] for o in r] for r, n in zip(raw, sizes, strict=True)]
    result = [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
    out: dict[str, Any] = {"artifact": args.artifact, "samples": len(data)}
    if rpc is not None:
        out["device"] = {"tracker": rpc[0], "key": rpc[1]}
    if data.labels is not None and result[0].ndim == 2:
        out["accuracy"] = score_outputs(MetricSpec("accuracy"), result, labels=data.labels).value
    if ref_model is not None:
        out["fidelity"] = compare_outputs(run_model(ref_model, data), result).to_dict()
    if runner is not None:
        out["threads"] = runner.threads
    if args.json:
        return EXIT_OK, out
    where = f" on a device of key '{rpc[1]}' at {rpc[0]}" if rpc is not None else ""
    threads = f", {runner.threads} thread(s): {runner.threads_from}" if runner is not None else ""
    lines = [f"{args.artifact}: ran {len(data)} samples ({meta['target']}, batch {batch}{threads}){where}"]
    if "accuracy" in out:
        lines.append(f"  top-1 accuracy {out['accuracy']:.4f}")
    if "fidelity" in out:
        f = out["fidelity"]
        lines.append(
            f"  vs {args.reference} in ONNX Runtime: max abs diff {f['max_abs_diff']:.3g}, "
            f"top-1 agreement {f['top1_agreement']}"
        )
    return EXIT_OK, "\n".join(lines)


def _padded_batches(data: Any, batch: int, names: list[str]) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """``data`` in whole batches of the artifact's static size (the tail padded with its last
    sample), and the real sample count of each."""
    feeds_list, sizes = [], []
    for b in data.batches(batch):
        n = len(b)
        feeds_list.append(
            {
                k: np.concatenate([v, np.repeat(v[-1:], batch - n, axis=0)]) if n < batch else v
                for k, v in b.inputs.items()
                if k in names
            }
        )
        sizes.append(n)
    return feeds_list, sizes


def _cmd_bench(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend.bench import batch_of, ort_contender, tvm_contender
    from graphslim.backend.options import parse_shapes
    from graphslim.core.data import load_data, random_inputs
    from graphslim.core.ir import load_model
    from graphslim.core.runtime import check_memory

    if args.rpc_tracker or args.rpc_key or args.target:
        return _bench_on_device(args)
    batches = _bench_batches(args)
    shapes = dict(parse_shapes(args.shape))
    artifact = Path(args.model).is_dir()
    baseline = load_model(args.baseline) if args.baseline else None
    if baseline is not None:
        check_memory(baseline, batch=max(batches), what=args.baseline)
    runs = {"warmup": args.warmup, "repeat": args.repeat, "rounds": args.rounds, "max_seconds": 60.0}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def feeds_for(model: Any, batch: int) -> dict[str, np.ndarray]:
        """One batch of --data, or seeded random inputs (--shape binds symbolic dims)."""
        if shapes:
            from graphslim.kernels.prepare import fix_shapes

            model = fix_shapes(model, shapes, batch)[0]
        return batch_of(load_data(args.data, model) if args.data else random_inputs(model, batch, 0), batch)

    if artifact:
        # The artifact has one static batch; the baseline runs on the very same inputs.
        model_c = tvm_contender(
            "model",
            args.model,
            threads=args.threads,
            feeds=(lambda meta: feeds_for(_model_for_inputs(meta), meta["batch"])) if args.data else None,
        )
        model_c.info["path"] = args.model
        contenders = [_baseline_contender(args, baseline, model_c.feeds, model_c.batch)] if baseline is not None else []
        rows += _interleave([*contenders, model_c], runs)
    else:
        model = load_model(args.model)
        sizes, why = _batch_sizes(model, batches)
        check_memory(model, batch=max(sizes), what=args.model)
        skipped += [{"what": "model", "batch": b, "reason": why} for b in batches if b not in sizes]
        for b in sizes:
            feeds = feeds_for(model, b)
            contenders = [_baseline_contender(args, baseline, feeds, b)] if baseline is not None else []
            c = ort_contender("model", model, feeds, b, threads=args.threads or 0)
            c.info["path"] = args.model
            contenders.append(c)
            rows += _interleave(contenders, runs)
    if args.json:
        return EXIT_OK, {"results": rows, "skipped": skipped}
    return EXIT_OK, _bench_table(rows, skipped, baseline is not None)


def _baseline_contender(args: argparse.Namespace, baseline: Any, feeds: dict[str, np.ndarray], batch: int) -> Any:
    """bench's --baseline in ONNX Runtime on the model's own inputs (refused if it takes others)."""
    from graphslim.backend.bench import ort_contender

    names = {vi.name for vi in baseline.graph.input} - {i.name for i in baseline.graph.initializer}
    if set(feeds) != names:
        raise InputError(f"--baseline {args.baseline} takes inputs {sorted(names)}; the model takes {sorted(feeds)}")
    c = ort_contender("baseline", baseline, feeds, batch, threads=args.threads or 0)
    c.info["path"] = args.baseline
    return c


def _bench_batches(args: argparse.Namespace) -> list[int]:
    """bench's --batch sizes, after checking them and --repeat, --rounds, --warmup, --threads."""
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch: expected sizes like 1,32, got {args.batch[:80]!r}") from None
    if not batches or min(batches) < 1 or max(batches) > 2**20:
        raise InputError("--batch sizes must be from 1 to 1048576")
    if args.repeat < 1 or args.warmup < 0 or args.rounds < 1:
        raise InputError("--repeat and --rounds must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1")
    return batches


def _bench_table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], with_baseline: bool) -> str:
    """bench's table for people: one row per runtime and batch, then what was skipped."""
    lines = [
        f"{'what':<9} {'runtime':<18} {'thr':>3} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} "
        f"{'per s':>10} {'vs base':>8} {'+MB peak':>9}"
    ]
    for r in rows:
        vs = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] is not None else "-"
        extra = r.get("memory", {}).get("extra_mb")
        lines.append(
            f"{r['what']:<9} {r['runtime']:<18} {r.get('threads') or '-':>3} {r['batch']:>5} {r['median_ms']:>10.4f} "
            f"{r['p90_ms']:>9.4f} {r['p99_ms']:>9.4f} {r['throughput_per_s']:>10.1f} {vs:>8} "
            f"{'-' if extra is None else format(extra, '.1f'):>9}"
        )
    if with_baseline:
        lines.append(
            f"vs base: median over {rows[-1]['rounds']} rounds of (model / baseline), the two alternating in each round"
        )
    lines += [f"skipped: {s['what']} at batch {s['batch']} ({s['reason']})" for s in skipped]
    return "\n".join(lines)


def _batch_sizes(model: Any, wanted: list[int]) -> tuple[list[int], str]:
    """The batch sizes of ``wanted`` the model accepts, and why the others are not: a model
    whose inputs fix the first dimension runs at that batch only (benched at it when none of
    ``wanted`` is allowed)."""
    inits = {i.name for i in model.graph.initializer}
    fixed = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed.add(dims[0].dim_value)
    if not fixed:
        return wanted, ""
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes {sorted(fixed)}; cannot bench it")
    b = fixed.pop()
    return [b], f"the model's batch is fixed at {b}"


def _bench_on_device(args: argparse.Namespace) -> tuple[int, Any]:
    """``bench --rpc-tracker HOST:PORT --rpc-key KEY``: ONNX Runtime here for the ONNX models
    given (MODEL, --baseline), and the compiled model on devices of the key (an artifact as it
    is, an ONNX MODEL built for --target at each --batch size)."""
    from graphslim.backend.bench import measure_ort
    from graphslim.backend.options import CompileOptions
    from graphslim.backend.remote import measure_artifact, measure_model, read_meta
    from graphslim.core.data import load_data, random_inputs
    from graphslim.core.ir import load_model

    rpc = _rpc_of(args)
    if rpc is None:
        raise InputError("--target times the model on a device: give --rpc-tracker HOST:PORT --rpc-key KEY too")
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch: expected sizes like 1,32, got {args.batch!r}") from None
    if not batches or min(batches) < 1 or args.repeat < 1 or args.warmup < 0:
        raise InputError("--batch sizes and --repeat must be >= 1, --warmup >= 0")
    artifact = Path(args.model).is_dir()
    meta = read_meta(args.model) if artifact else None
    if artifact and args.target:
        raise InputError(f"{args.model} is compiled (for {meta['target']}); --target is for ONNX models")
    if not artifact and not args.target:
        raise InputError("give --target T to build the ONNX model for the device (or bench a compiled artifact)")
    model = None if artifact else load_model(args.model)

    def data_for(m: Any, n: int) -> Any:
        return load_data(args.data, m) if args.data else random_inputs(m, n, 0)

    if artifact:
        batches = [meta["batch"]]
        data = data_for(_model_for_inputs(meta), meta["batch"])
    else:
        data = data_for(model, max(batches))
    runs = {"warmup": args.warmup, "repeat": args.repeat, "max_seconds": 30}
    rows: list[dict[str, Any]] = []
    # ONNX Runtime here, beside the device's figures (MODEL when it is an ONNX file, --baseline).
    for label, m in (("baseline", load_model(args.baseline) if args.baseline else None), ("model", model)):
        if m is not None:
            m_data = data if m is model else data_for(m, max(batches))
            for b in batches:
                path = args.baseline if label == "baseline" else args.model
                rows.append(
                    {"what": label, "path": path, "runtime": "onnxruntime", **measure_ort(m, m_data, batch=b, **runs)}
                )
    for b in batches:
        if artifact:
            timing = measure_artifact(args.model, rpc, data, wait_s=args.rpc_timeout, **runs)
        else:
            opts = CompileOptions(target=args.target, batch=b, rpc=rpc, rpc_timeout=args.rpc_timeout)
            timing = measure_model(model, opts, data, **runs)
        rows.append(
            {"what": "model", "path": args.model, "runtime": f"tvm ({timing['target']}) on '{rpc[1]}'", **timing}
        )
    base = {r["batch"]: r["median_ms"] for r in rows if r["what"] == "baseline"}
    for r in rows:
        r["vs_baseline"] = round(r["median_ms"] / base[r["batch"]], 4) if r["batch"] in base else None
    if args.json:
        return EXIT_OK, {"results": rows}
    return EXIT_OK, _device_table(rows)


def _device_table(rows: list[dict[str, Any]]) -> str:
    """bench --rpc-*'s table for people, with each device's share of the runs."""
    lines = [f"{'what':<9} {'runtime':<28} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'runs':>6} {'vs base':>8}"]
    for r in rows:
        vs = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] is not None else "-"
        lines.append(
            f"{r['what']:<9} {r['runtime'][:28]:<28} {r['batch']:>5} {r['median_ms']:>10.4f} {r['p90_ms']:>9.4f} "
            f"{r['runs']:>6} {vs:>8}"
        )
        for d in r.get("devices", []):
            lines.append(f"{'':<9}   device {d['server']}: {d['runs']} runs, median {d['median_ms']:.4f} ms")
        if r.get("retries"):
            lines.append(f"{'':<9}   {r['retries']} share(s) timed again after a device stopped answering")
    return "\n".join(lines)


def _cmd_devices(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend.remote import Tracker, list_devices

    tracker = Tracker.parse(args.rpc_tracker)
    keys = list_devices(tracker)
    if args.json:
        return EXIT_OK, {"tracker": str(tracker), "keys": keys}
    if not keys:
        return EXIT_OK, f"tracker {tracker}: no devices registered"
    width = max(3, *(len(k["key"]) for k in keys))
    lines = [
        f"tracker {tracker}",
        f"  {'key':<{width}} {'devices':>7} {'free':>5} {'in use':>6} {'pending':>7}  servers",
    ]
    for k in keys:
        lines.append(
            f"  {k['key']:<{width}} {k['devices']:>7} {k['free']:>5} {k['in_use']:>6} {k['pending']:>7}  "
            + ", ".join(k["servers"])
        )
    return EXIT_OK, "\n".join(lines)


def _interleave(contenders: list[Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    from graphslim.backend.bench import measure_interleaved

    base = "baseline" if any(c.label == "baseline" for c in contenders) else None
    rows = measure_interleaved(contenders, baseline=base, **runs)
    for c, r in zip(contenders, rows, strict=True):
        r["what"] = c.label
        # the rounds that ran: measure_interleaved runs at most one per timed call
        r["rounds"] = len(r.get("round_medians_ms") or []) or min(runs["rounds"], runs["repeat"])
        if base is None:
            r.pop("vs_baseline", None)
            r["vs_baseline"] = None
        if c.label == "baseline":
            r.pop("round_ratios", None)
            r["vs_baseline"] = 1.0
    return [{"what": r.pop("what"), "path": r.pop("path"), **r} for r in rows]


def _model_for_inputs(meta: dict[str, Any]) -> Any:
    """A stand-in ONNX model declaring the artifact's inputs, to validate data files against."""
    import onnx
    from onnx import helper

    inputs = [
        helper.make_tensor_value_info(
            i["name"], helper.np_dtype_to_tensor_dtype(np.dtype(i["dtype"])), ["N", *i["shape"][1:]]
        )
        for i in meta["inputs"]
    ]
    graph = helper.make_graph([], "inputs", inputs, [])
    return onnx.helper.make_model(graph)


def _cmd_report(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.core.fs import update_output_files
    from graphslim.report import load_report, render_files

    rep = load_report(args.folder)
    files = render_files(rep)
    files.pop("report.json")  # the source stays as it is
    update_output_files(args.folder, "optimize", files)
    return EXIT_OK, {
        "written": sorted(files)
    } if args.json else f"re-rendered {', '.join(sorted(files))} in {args.folder}"


def _cmd_compare(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.core.fs import OutputDir

    with contextlib.ExitStack() as stack:
        dest = (
            stack.enter_context(OutputDir(args.output, "compare", inputs=args.folders, force=args.force))
            if args.output
            else None
        )
        return _compare(args, dest)


def _compare(args: argparse.Namespace, dest: Any) -> tuple[int, Any]:
    import base64
    import html

    from graphslim.report import compare_markdown, compare_plot, load_report

    runs = [(Path(f).name or str(f), load_report(f)) for f in args.folders]
    table = compare_markdown(runs)
    if dest is not None:
        png = compare_plot(runs)
        files = {"compare.md": (table + ("\n![accuracy vs r](compare.png)\n" if png else "")).encode()}
        body = "<pre>" + html.escape(table) + "</pre>"
        if png:
            files["compare.png"] = png
            body += f"<img alt='accuracy vs r' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        files["compare.html"] = f"<!doctype html><meta charset='utf-8'><title>graphslim compare</title>{body}".encode()
        dest.write(files)
    if args.json:
        return EXIT_OK, {
            "runs": [
                {
                    "name": n,
                    "pipeline": r["pipeline"],
                    "compression": r["compression"],
                    "accuracy": r.get("accuracy"),
                    "latency": r.get("latency"),
                }
                for n, r in runs
            ]
        }
    return EXIT_OK, table


COMMANDS = {
    "optimize": _cmd_optimize,
    "inspect": _cmd_inspect,
    "passes": _cmd_passes,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "compile": _cmd_compile,
    "run": _cmd_run,
    "bench": _cmd_bench,
    "search": _cmd_search,
    "devices": _cmd_devices,
}


class _Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that cleanup code sees it like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


_MAX_MESSAGE = 1000  # characters of an error message echoed (a value in it may be huge)


def _one_message(e: BaseException) -> str:
    text = str(e)
    if len(text) > _MAX_MESSAGE:
        text = f"{text[:_MAX_MESSAGE]}... ({len(text):,} characters, cut)"
    return text


def _flush_c_stdio() -> None:
    """Flush what native code printed through C stdio, before its file descriptors move."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


class _LogStream(io.TextIOBase):
    """A text stream whose lines become log records (what libraries print() while graphslim
    runs them: ONNX Runtime's calibrators print progress, for instance)."""

    def __init__(self, logger: logging.Logger, level: int):
        self._log, self._level, self._part = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        lines = (self._part + s).split("\n")
        self._part = lines.pop()
        for line in lines:
            if line.strip():
                self._log.log(self._level, "%s", line.rstrip())
        return len(s)

    def flush(self) -> None:
        if self._part.strip():
            self._log.log(self._level, "%s", self._part.rstrip())
        self._part = ""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[Any]:
    """While a command runs, stdout carries nothing but graphslim's own output (with --json: one
    JSON document). What libraries print() goes through logging (shown with -v); what native code
    writes to file descriptor 1 goes to stderr. Yields the real stdout."""
    real = sys.stdout
    real.flush()
    saved = None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        fd = real.fileno()
        err = sys.stderr.fileno()
        _flush_c_stdio()
        saved = (fd, os.dup(fd))
        os.dup2(err, fd)
    printed = _LogStream(logging.getLogger("graphslim.printed"), logging.INFO)
    try:
        with contextlib.redirect_stdout(printed):
            yield real
    finally:
        printed.flush()
        sys.stderr.flush()
        if saved is not None:
            _flush_c_stdio()
            os.dup2(saved[1], saved[0])
            os.close(saved[1])


def _configure_logging(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", False)
    level = (
        logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.INFO if verbose else logging.WARNING
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="graphslim: %(levelname)s: %(message)s")
    # Python warnings of the libraries (onnxruntime.quantization, TVM, numpy) go through logging,
    # shown with -v; ONNX Runtime's native log follows the same level (graphslim.core.runtime).
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose or args.debug else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _configure_logging(args)
    if not args.command:
        ap.print_help(sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so half-written output folders are cleaned up (see graphslim.core.fs).
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    wants_json = getattr(args, "json", False)
    try:
        try:
            # Temporary files of graphslim and of the libraries it runs go into one scratch
            # folder under TMPDIR, removed when the command ends, also on Ctrl-C or SIGTERM.
            with private_tmpdir(), _stdout_to_stderr() as stdout:
                code, out = COMMANDS[args.command](args)
        finally:
            remove_scratch()  # a signal deferred in here is caught below
    except GraphslimError as e:
        if args.debug:
            log.exception("failed")
        print(f"graphslim: error: {_one_message(e)}", file=sys.stderr)
        if wants_json:
            print(json.dumps({"error": _one_message(e), "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("graphslim: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("graphslim: terminated", file=sys.stderr)
        return 143
    except SystemExit as e:  # a plugin or a data function called sys.exit: a failure, whatever the code
        if args.debug:
            log.exception("failed")
        print(
            f"graphslim: internal error: something graphslim called (a plugin?) called sys.exit({e.code!r}) "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - a bug in graphslim: one line unless --debug
        if args.debug:
            raise
        print(
            f"graphslim: internal error: {type(e).__name__}: {_one_message(e)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if wants_json and not isinstance(out, str):
        print(json.dumps(out, indent=2, default=str, allow_nan=False), file=stdout)
    elif out and not args.quiet:
        print(out, file=stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
