"""A BERT-style encoder (seq 128) in ONNX Runtime and compiled with TVM, dense and compressed.

The model: ``tests/transformer_models.bert_like`` with hidden 256, 4 layers, 8 heads, FFN 1024,
vocabulary 2048 (random weights; 4.3M parameters, 436M multiply-adds per sequence of 128).
Contenders, all timed interleaved in one process (``graphslim.backend.bench.measure_interleaved``:
rounds in which every contender runs a block of calls; each speed-up is the median over rounds
of the per-round ratio, so the load of a shared machine cancels), per batch size:

* ORT fp32: ONNX Runtime on the original (all graph optimizations);
* ORT quantize_dynamic: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights) of the original;
* TVM dense: ``graphslim compile`` of the original;
* TVM pruned + int8: ``prune-heads{ratio=0.5},prune-channels{ratio=0.5}`` then
  ``quantize-int8{mode=dynamic,op_types=[MatMul,Gemm]}`` (dynamic int8 activations, int8 weights),
  compiled (the int8 matmuls run on graphslim's int8 kernel through the ``int8-integer`` rewrite);
* TVM pruned + int8, 7-bit weights: the same with ``reduce_range=true`` (weights within +-63,
  as ONNX Runtime's ``reduce_range``), which the int8 kernel runs on AVX2's byte instructions
  (``vpmaddubsw``) exactly instead of widening to int16;
* TVM pruned + block-sparse: the pruned model with ``sparsify-blocks{sparsity=0.9,block=B}`` on
  its MatMuls (B = 16x1 and 1x4), compiled (graphslim's BSR kernels).

Next to every speed figure: fidelity, the mask-pooled cosine between the contender's
``last_hidden_state`` and the original fp32 model's (ORT), on held-out seeded inputs (random
token ids, the last sample padded; ``--eval`` sequences). The weights are random, so there is no
task accuracy; what a compressed model needs before deployment is a distillation fine-tune
against the original (``distill``), which these numbers do not include. Memory: the peak resident
memory that creating the session / loading the artifact and one run added to a fresh process
(one child process per contender and batch: in the benchmark's own process, memory freed by
compiling and by earlier contenders is reused and hides part of the cost).

    pip install -e ".[ort,tvm]"
    python benchmarks/transformer_speed.py [--batches 1,16] [--threads 1] [--repeat 21] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformer_models as tm  # noqa: E402

SEQ = 128
CONFIG = {"hidden": 256, "layers": 4, "heads": 8, "ffn": 1024, "vocab": 2048, "max_positions": SEQ}
PRUNE = "prune-heads{ratio=0.5},prune-channels{ratio=0.5}"
INT8 = "quantize-int8{mode=dynamic,op_types=[MatMul,Gemm]}"
# 7-bit weights (ONNX Runtime's reduce_range): the int8 kernel's AVX2 byte path sums them exactly
INT8_7BIT = "quantize-int8{mode=dynamic,op_types=[MatMul,Gemm],reduce_range=true}"


def sparse(block: str) -> str:
    return f"sparsify-blocks{{sparsity=0.9,block=[{block}],ops=[MatMul]}}"


def build_models(folder: Path) -> dict[str, Path]:
    """The ONNX models: original, ORT dynamic int8, and graphslim's compressed variants."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import graphslim

    paths = {"original": folder / "bert.onnx", "ort_int8": folder / "bert_ort_int8.onnx"}
    onnx.save(tm.bert_like(tm.make_config("bert", **CONFIG)), str(paths["original"]))
    quantize_dynamic(str(paths["original"]), str(paths["ort_int8"]), weight_type=QuantType.QInt8)
    pruned = folder / "pruned"
    graphslim.optimize(paths["original"], pruned, pipeline=PRUNE, measure_latency=False)
    variants = (
        ("pruned_int8", INT8),
        ("pruned_int8_7bit", INT8_7BIT),
        ("pruned_bsr16x1", sparse("16,1")),
        ("pruned_bsr1x4", sparse("1,4")),
    )
    for name, pipeline in variants:
        graphslim.optimize(pruned / "model.onnx", folder / name, pipeline=pipeline, measure_latency=False)
        paths[name] = folder / name / "model.onnx"
    return paths


@functools.cache
def _model() -> onnx.ModelProto:
    return tm.bert_like(tm.make_config("bert", **CONFIG))


def fidelity(run, batch: int, samples: int, reference) -> float:
    """Mask-pooled cosine of ``run(feeds)`` against ``reference(feeds)`` over ``samples`` held-out
    sequences (seeds 1000+), averaged over batches."""
    scores = []
    for i in range(max(1, samples // batch)):
        feeds = tm.sample_inputs_for(_model(), batch=batch, seq=SEQ, seed=1000 + i)
        scores.append(tm.pooled_cosine(run(feeds)[0], reference(feeds)[0], feeds["attention_mask"]))
    return float(np.mean(scores))


def fresh_memory(kind: str, path: Path, feeds: Path, threads: int | None) -> dict:
    """What creating ``kind`` ("ort": an ONNX Runtime session from the file, as a deployment
    creates it; "tvm": loading the artifact) on ``path`` and one run on ``feeds`` (an .npz) add
    to a new process that has done nothing else."""
    import json
    import subprocess

    argv = [sys.executable, __file__, "--memory-of", kind, str(path), str(feeds), "--threads", str(threads or 0)]
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _memory_child(kind: str, path: str, feeds_path: str, threads: int | None) -> None:
    import json

    from graphslim.backend.bench import PeakMemory, tvm_contender

    feeds = dict(np.load(feeds_path))
    if kind == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads or 0
        with PeakMemory() as mem:
            ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, feeds)
        print(json.dumps(mem.result()))
    else:
        c = tvm_contender(kind, Path(path), threads=threads, feeds=lambda meta: feeds)
        print(json.dumps(c.info["memory"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-of", nargs=3, metavar=("KIND", "PATH", "FEEDS"), help=argparse.SUPPRESS)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=1, help="threads for every contender (ORT and TVM); 0: defaults")
    ap.add_argument("--repeat", type=int, default=21, help="timed runs per contender and batch")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--eval", type=int, default=32, help="held-out sequences for fidelity")
    ap.add_argument("--workdir", type=Path, help="keep models and artifacts here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="also write the tables (Markdown) here")
    args = ap.parse_args()
    if args.memory_of:
        _memory_child(*args.memory_of, args.threads or None)
        return
    from graphslim.backend import compile_model
    from graphslim.backend.bench import measure_interleaved, ort_contender, tvm_contender
    from graphslim.core.runtime import ort_session

    batches = [int(b) for b in args.batches.split(",")]
    threads = args.threads or None
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="graphslim-bert-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = build_models(folder)
        say(f"models built in {time.perf_counter() - t0:.0f} s")
        compiled = {
            "tvm_dense": "original",
            "tvm_pruned_int8": "pruned_int8",
            "tvm_pruned_int8_7bit": "pruned_int8_7bit",
        }
        compiled |= {"tvm_pruned_bsr16x1": "pruned_bsr16x1", "tvm_pruned_bsr1x4": "pruned_bsr1x4"}
        artifacts: dict[tuple[str, int], Path] = {}
        for b in batches:
            for name, src in compiled.items():
                out = folder / f"{name}_b{b}"
                t0 = time.perf_counter()
                art = compile_model(
                    onnx.load(str(paths[src])), "x86", out, shapes={"input_ids": [b, SEQ]}, threads=threads
                )
                artifacts[name, b] = out
                say(f"compiled {name} batch {b} in {time.perf_counter() - t0:.0f} s: rewrites {art.meta['rewrites']}")
        original = ort_session(onnx.load(str(paths["original"])), optimize=True)

        def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return original.run(None, feeds)

        labels = {
            "ort_fp32": "ORT fp32 (original)",
            "ort_int8": "ORT quantize_dynamic (original)",
            "tvm_dense": "TVM dense (original)",
            "tvm_pruned_int8": "TVM pruned 50% heads+FFN + int8 dynamic",
            "tvm_pruned_int8_7bit": "TVM pruned 50% heads+FFN + int8 dynamic, 7-bit weights",
            "tvm_pruned_bsr16x1": "TVM pruned 50% + 90% block-sparse 16x1",
            "tvm_pruned_bsr1x4": "TVM pruned 50% + 90% block-sparse 1x4",
        }
        say()
        say(
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
            f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min) at the start; threads: "
            f"{threads or 'defaults (ORT its own, TVM graphslim policy)'}"
        )
        for b in batches:
            feeds = tm.sample_inputs_for(_model(), batch=b, seq=SEQ, seed=0)
            contenders = [
                ort_contender("ort_fp32", onnx.load(str(paths["original"])), feeds, b, threads=threads or 0),
                ort_contender("ort_int8", onnx.load(str(paths["ort_int8"])), feeds, b, threads=threads or 0),
            ]
            runners = {}
            for name in compiled:
                c = tvm_contender(name, artifacts[name, b], threads=threads, feeds=lambda meta, f=feeds: f)
                contenders.append(c)
            t0 = time.perf_counter()
            rows = measure_interleaved(
                contenders, warmup=2, repeat=args.repeat, rounds=args.rounds, max_seconds=600, baseline="ort_fp32"
            )
            seconds = time.perf_counter() - t0
            load = os.getloadavg()[0]
            by = {c.label: r for c, r in zip(contenders, rows, strict=True)}
            vs_int8 = {
                k: float(np.median(np.array(by["ort_int8"]["round_medians_ms"]) / np.array(r["round_medians_ms"])))
                for k, r in by.items()
            }
            # fidelity, after timing (TVM's thread pool would slow ORT's reference runs otherwise)
            fid = {}
            for c in contenders:
                if c.label == "ort_fp32":
                    fid[c.label] = 1.0
                elif c.label == "ort_int8":
                    sess = ort_session(onnx.load(str(paths["ort_int8"])), optimize=True)
                    fid[c.label] = fidelity(lambda f, s=sess: s.run(None, f), b, args.eval, reference)
                else:
                    from graphslim.backend import load_artifact

                    runners[c.label] = load_artifact(artifacts[c.label, b], threads=threads)
                    fid[c.label] = fidelity(runners[c.label], b, args.eval, reference)
            say()
            say(f"### Batch {b} (sequence {SEQ}), {args.rounds} rounds, {seconds:.0f} s, load {load:.1f} at the end")
            say()
            say(
                "| contender | threads | median ms | p90 ms | speed-up vs ORT fp32 | vs ORT quantize_dynamic | "
                "fidelity (pooled cosine vs original) | +MB peak (fresh process) |"
            )
            say("|---|---:|---:|---:|---:|---:|---:|---:|")
            np.savez(folder / f"feeds_b{b}.npz", **feeds)
            fresh = folder / f"feeds_b{b}.npz"
            memory = {
                "ort_fp32": fresh_memory("ort", paths["original"], fresh, threads),
                "ort_int8": fresh_memory("ort", paths["ort_int8"], fresh, threads),
            }
            memory |= {name: fresh_memory("tvm", artifacts[name, b], fresh, threads) for name in compiled}
            for c in contenders:
                r = by[c.label]
                speed = 1.0 / r["vs_baseline"] if r.get("vs_baseline") else 1.0
                say(
                    f"| {labels[c.label]} | {r.get('threads') or c.info.get('threads') or 'default'} | "
                    f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {speed:.2f}x | {vs_int8[c.label]:.2f}x | "
                    f"{fid[c.label]:.4f} | {memory[c.label]['extra_mb']} |"
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
