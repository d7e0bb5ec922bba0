"""The ``graphslim`` command line.

Exit codes: 0 success; 1 internal error; 2 bad input or usage (unreadable or invalid model,
unknown pass or option, bad data file); 3 a budget was missed (outputs are still written).
Errors print one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphslim.core.errors import EXIT_BUDGET, EXIT_INTERNAL, EXIT_OK, GraphslimError, InputError
from graphslim.core.version import __version__

__all__ = ["main"]

log = logging.getLogger("graphslim")

EPILOG = """exit codes: 0 success, 1 internal error, 2 bad input or usage, 3 budget missed"""
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
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="graphslim",
        description="Compress and compile ONNX models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"graphslim {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (and --json output)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    o = sub.add_parser("optimize", help="run a pass pipeline on a model and write OUT_DIR", epilog=EPILOG)
    o.add_argument("model", help="input .onnx file (never modified)")
    o.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_DIR",
        help="output folder: model.onnx, report.json, report.md (replaced whole, atomically)",
    )
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
        help="budget: exit 3 if top-1 accuracy falls by more (without labels: disagreement with the original)",
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
    _add_common(c)

    k = sub.add_parser("compile", help="compile a model with TVM for x86, ARM or CUDA (extra: tvm)")
    k.add_argument("model")
    k.add_argument("--target", required=True, choices=TARGET_CHOICES)
    k.add_argument(
        "--batch",
        type=int,
        help="static batch size: symbolic leading dimensions (default: as --shape gives them, else 1)",
    )
    k.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="model.so (or .tar) and artifact.json")
    _add_shape(k)
    _add_tuning(k)
    _add_threads(k, "threads the artifact runs (and tuning measures) with, recorded in artifact.json")
    _add_common(k)

    rn = sub.add_parser("run", help="run a compiled artifact on data (accuracy where labels exist)")
    rn.add_argument("artifact", metavar="ARTIFACT_DIR")
    rn.add_argument("--data", required=True, metavar="DATA")
    rn.add_argument("--reference", metavar="MODEL", help="compare outputs with this ONNX model in ONNX Runtime")
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
    _add_common(bn)

    e = sub.add_parser("eval", help="top-1 accuracy on labelled data, or fidelity to a reference model")
    e.add_argument("model")
    e.add_argument("--data", required=True, metavar="DATA", help="FILE.npz, a folder of shards, or module:function")
    e.add_argument("--reference", metavar="MODEL", help="compare outputs with this model (e.g. the teacher)")
    _add_common(e)
    return ap


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
        measure_latency=not args.no_latency,
        progress=not (args.quiet or args.json),
        cache_dir=args.cache_dir,
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
    if args.json:
        return code, rep
    c, b, a = rep["compression"], rep["before"], rep["after"]
    lines = [
        f"wrote {Path(args.output) / 'model.onnx'}, report.json and report.html",
        f"  params {b['params']:,} -> {a['params']:,} (r = {c['r_params']})",
        f"  MACs   {b['macs']:,} -> {a['macs']:,}",
        f"  bytes  {b['size_bytes']:,} -> {a['size_bytes']:,}",
    ]
    if rep.get("accuracy"):
        acc = rep["accuracy"]
        lines.append(f"  accuracy {acc['before']:.4f} -> {acc['after']:.4f} ({acc['samples']} samples)")
    for r in rep["passes"]:
        scalars = ", ".join(f"{k}={v}" for k, v in r["stats"].items() if not isinstance(v, list | dict))
        lines.append(f"  {r['pipeline']}: {'changed' if r['changed'] else 'no change'} ({scalars})")
    if rep["skipped"]:
        lines.append(f"  left unchanged: {len(rep['skipped'])} part(s), reasons in report.md")
    return code, "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.core.data import load_data
    from graphslim.core.ir import load_model
    from graphslim.core.metrics import accuracy, compare_outputs
    from graphslim.core.runtime import ort_session, run_model

    model = load_model(args.model)
    data = load_data(args.data, model)
    out: dict[str, Any] = {"model": args.model, "samples": len(data), "accuracy": accuracy(model, data)}
    if args.reference:
        ref = load_model(args.reference)
        try:
            fid = compare_outputs(run_model(ort_session(ref), data), run_model(ort_session(model), data))
        except ValueError as e:
            raise InputError(f"cannot compare with the reference: {e}") from None
        out["fidelity"] = fid.to_dict()
        out["reference_accuracy"] = accuracy(ref, data)
    if out["accuracy"] is None and not args.reference:
        raise InputError(f"{args.data}: no labels to compute accuracy; give --reference MODEL to measure fidelity")
    if args.json:
        return EXIT_OK, out
    lines = [f"{args.model} on {len(data)} samples"]
    if out["accuracy"] is not None:
        lines.append(f"  top-1 accuracy {out['accuracy']:.4f}")
    if args.reference:
        f = out["fidelity"]
        lines.append(
            f"  vs {args.reference}: top-1 agreement {f['top1_agreement']}, cosine {f['cosine']:.6f}, "
            f"max abs diff {f['max_abs_diff']:.4g}"
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
        lines.append(f"  {'layer':<32} {'op':<20} {'params':>10} {'MACs':>14} {'sparsity':>9}  block sparsity")
        for lc in rep.layers:
            if lc.params or lc.macs:
                blocks = " ".join(f"{k}:{v:.0%}" for k, v in lc.extra.get("block_sparsity", {}).items())
                lines.append(
                    f"  {lc.name[:32]:<32} {lc.op:<20} {lc.params:>10,} {lc.macs:>14,} {lc.sparsity:>9.2%}  {blocks}"
                )
    if groups is not None:
        n_ok = sum(1 for grp in groups if grp["prunable"])
        lines.append(f"  channel groups: {len(groups)}, prunable: {n_ok}")
        for grp in groups:
            roots = ", ".join(m["root"] for m in grp["members"])
            state = (
                f"prunable ({grp['channels']} channels)"
                if grp["prunable"]
                else "frozen: " + "; ".join(grp["why_not"][:2])
            )
            lines.append(f"  group {grp['group']:>3}: [{roots}] {state}")
            for m in grp["members"]:
                lines.append(f"      {m['root']}: {', '.join(m['uses'])}")
    return EXIT_OK, "\n".join(lines)


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
    g.add_argument(
        "--rpc-tracker",
        metavar="HOST:PORT",
        help="measure on a device registered with this TVM RPC "
        "tracker (needed to tune a cross-compiled target such as arm)",
    )
    g.add_argument("--rpc-key", metavar="KEY", help="device key at the RPC tracker")


def _compile_options(args: argparse.Namespace, *, target: str | None, batch: int | None = None) -> Any:
    """The CompileOptions of a command's --shape and tuning flags (validated here: usage errors
    before work)."""
    from graphslim.backend.options import CompileOptions, parse_shapes

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise InputError("--rpc-tracker and --rpc-key go together")
    if args.rpc_tracker and not re.fullmatch(r"[^:\s]+:\d+", args.rpc_tracker):
        raise InputError(f"--rpc-tracker: expected HOST:PORT, got {args.rpc_tracker!r}")
    return CompileOptions(
        target=target,
        shapes=parse_shapes(getattr(args, "shape", None)),
        batch=batch,
        tune=args.tune,
        tuning_db=args.tuning_db,
        rpc=(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None,
        threads=getattr(args, "threads", None),
    )


def _cmd_compile(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend import compile_model
    from graphslim.core.fs import check_out_dir
    from graphslim.core.ir import load_model, model_file_sha256

    c = _compile_options(args, target=args.target, batch=args.batch)
    check_out_dir(Path(args.model), Path(args.output))
    model = load_model(args.model)
    art = compile_model(
        model,
        c.target,
        Path(args.output),
        batch=c.batch,
        shapes={k: list(v) for k, v in c.shapes} or None,
        model_sha256=model_file_sha256(Path(args.model)),
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
    from graphslim.core.metrics import compare_outputs
    from graphslim.core.runtime import run_model

    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1")
    runner = load_artifact(args.artifact, threads=args.threads)
    batch = runner.meta["batch"]
    names = [i["name"] for i in runner.meta["inputs"]]
    ref_model = load_model(args.reference) if args.reference else None
    # The artifact has a static batch: feed it whole batches (the tail is padded, then cut).
    template = ref_model or _model_for_inputs(runner.meta)
    data = load_data(args.data, template)
    outs: list[list[np.ndarray]] = []
    for b in data.batches(batch):
        n = len(b)
        feeds = {
            k: np.concatenate([v, np.repeat(v[-1:], batch - n, axis=0)]) if n < batch else v
            for k, v in b.inputs.items()
            if k in names
        }
        outs.append([o[:n] for o in runner(feeds)])
    result = [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
    out: dict[str, Any] = {"artifact": args.artifact, "samples": len(data)}
    if data.labels is not None and result[0].ndim == 2:
        out["accuracy"] = float(np.mean(np.argmax(result[0], 1) == data.labels))
    if ref_model is not None:
        out["fidelity"] = compare_outputs(run_model(ref_model, data), result).to_dict()
    if args.json:
        return EXIT_OK, out
    out["threads"] = runner.threads
    lines = [
        f"{args.artifact}: ran {len(data)} samples ({runner.meta['target']}, batch {batch}, "
        f"{runner.threads} thread(s): {runner.threads_from})"
    ]
    if "accuracy" in out:
        lines.append(f"  top-1 accuracy {out['accuracy']:.4f}")
    if "fidelity" in out:
        f = out["fidelity"]
        lines.append(
            f"  vs {args.reference} in ONNX Runtime: max abs diff {f['max_abs_diff']:.3g}, "
            f"top-1 agreement {f['top1_agreement']}"
        )
    return EXIT_OK, "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> tuple[int, Any]:
    from graphslim.backend.bench import batch_of, ort_contender, tvm_contender
    from graphslim.backend.options import parse_shapes
    from graphslim.core.data import load_data, random_inputs
    from graphslim.core.ir import load_model

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch: expected sizes like 1,32, got {args.batch!r}") from None
    if not batches or min(batches) < 1 or args.repeat < 1 or args.warmup < 0 or args.rounds < 1:
        raise InputError("--batch sizes, --repeat and --rounds must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1")
    shapes = dict(parse_shapes(args.shape))
    artifact = Path(args.model).is_dir()
    baseline = load_model(args.baseline) if args.baseline else None
    runs = {"warmup": args.warmup, "repeat": args.repeat, "rounds": args.rounds, "max_seconds": 60.0}
    rows: list[dict[str, Any]] = []

    def feeds_for(model: Any, batch: int) -> dict[str, np.ndarray]:
        """One batch of --data, or seeded random inputs (--shape binds symbolic dims)."""
        if shapes:
            from graphslim.kernels.prepare import fix_shapes

            model = fix_shapes(model, shapes, batch)[0]
        return batch_of(load_data(args.data, model) if args.data else random_inputs(model, batch, 0), batch)

    def baseline_contender(feeds: dict[str, np.ndarray], batch: int) -> Any:
        names = {vi.name for vi in baseline.graph.input} - {i.name for i in baseline.graph.initializer}
        if set(feeds) != names:
            raise InputError(
                f"--baseline {args.baseline} takes inputs {sorted(names)}; the model takes {sorted(feeds)}"
            )
        c = ort_contender("baseline", baseline, feeds, batch, threads=args.threads or 0)
        c.info["path"] = args.baseline
        return c

    if artifact:
        # The artifact has one static batch; the baseline runs on the very same inputs.
        model_c = tvm_contender(
            "model",
            args.model,
            threads=args.threads,
            feeds=(lambda meta: feeds_for(_model_for_inputs(meta), meta["batch"])) if args.data else None,
        )
        model_c.info["path"] = args.model
        contenders = [baseline_contender(model_c.feeds, model_c.batch)] if baseline is not None else []
        rows += _interleave([*contenders, model_c], runs)
    else:
        model = load_model(args.model)
        for b in batches:
            feeds = feeds_for(model, b)
            contenders = [baseline_contender(feeds, b)] if baseline is not None else []
            c = ort_contender("model", model, feeds, b, threads=args.threads or 0)
            c.info["path"] = args.model
            contenders.append(c)
            rows += _interleave(contenders, runs)
    if args.json:
        return EXIT_OK, {"results": rows}
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
    if baseline is not None:
        lines.append(
            f"vs base: median over {args.rounds} rounds of (model / baseline), the two alternating in each round"
        )
    return EXIT_OK, "\n".join(lines)


def _interleave(contenders: list[Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    from graphslim.backend.bench import measure_interleaved

    base = "baseline" if any(c.label == "baseline" for c in contenders) else None
    rows = measure_interleaved(contenders, baseline=base, **runs)
    for c, r in zip(contenders, rows, strict=True):
        r["what"] = c.label
        r["rounds"] = runs["rounds"]
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
    from graphslim.core.fs import atomic_write
    from graphslim.report import load_report, render_files

    rep = load_report(args.folder)
    files = render_files(rep)
    files.pop("report.json")  # the source stays as it is
    for name, data in files.items():
        atomic_write(Path(args.folder) / name, data)
    return EXIT_OK, {
        "written": sorted(files)
    } if args.json else f"re-rendered {', '.join(sorted(files))} in {args.folder}"


def _cmd_compare(args: argparse.Namespace) -> tuple[int, Any]:
    import base64
    import html

    from graphslim.core.fs import write_output_dir
    from graphslim.report import compare_markdown, compare_plot, load_report

    runs = [(Path(f).name or str(f), load_report(f)) for f in args.folders]
    table = compare_markdown(runs)
    if args.output:
        png = compare_plot(runs)
        files = {"compare.md": (table + ("\n![accuracy vs r](compare.png)\n" if png else "")).encode()}
        body = "<pre>" + html.escape(table) + "</pre>"
        if png:
            files["compare.png"] = png
            body += f"<img alt='accuracy vs r' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        files["compare.html"] = f"<!doctype html><meta charset='utf-8'><title>graphslim compare</title>{body}".encode()
        write_output_dir(Path(args.output), files)
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
}


class _Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that cleanup code sees it like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr, format="graphslim: %(levelname)s: %(message)s")
    if not args.command:
        ap.print_help(sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so half-written output folders are cleaned up (see write_output_dir).
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        code, out = COMMANDS[args.command](args)
    except GraphslimError as e:
        if args.debug:
            log.exception("failed")
        print(f"graphslim: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("graphslim: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("graphslim: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - a bug in graphslim: one line unless --debug
        if args.debug:
            raise
        print(
            f"graphslim: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if getattr(args, "json", False) and not isinstance(out, str):
        print(json.dumps(out, indent=2, default=str))
    elif out and not args.quiet:
        print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
