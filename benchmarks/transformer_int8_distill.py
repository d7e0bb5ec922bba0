"""Int8 and hidden-state distillation on a BERT-style encoder, side by side with ONNX Runtime.

    python benchmarks/transformer_int8_distill.py [--hidden 256 --layers 4 --heads 4 --ffn 1024
        --vocab 8000 --seq 128 --train 400 --eval 100 --epochs 6 --rounds 10]

Rows: ORT fp32 (the model), ORT ``quantize_dynamic`` (QInt8 weights, its defaults), graphslim
dynamic int8, graphslim static int8, the pruning pipeline (``PRUNING``: half the attention heads
and half the FFN inner dims) + hidden-state distillation, and that + dynamic int8 with 8-bit and
with 7-bit weights (``reduce_range=true``: what graphslim's compiled int8 kernel runs on AVX2's
byte instructions, see ``transformer_speed.py``). Columns: size
on disk, encoder-layer parameters against the original, held-out pooled cosine (mask-weighted
mean of ``last_hidden_state``, the sentence embedding, against the original, on ``--eval``
samples no pass saw), and ONNX Runtime latency at batch 1 and 16 (sequence ``--seq``, graph
optimizations on, 2 threads): each round times every model in turn (rotated order), the table
gives the median over rounds of each model's median ms and of its per-round speed-up over fp32
(fp32 ms / model ms: > 1 = faster).

No pretrained model is reachable here: the encoder is ``tests/transformer_models.bert_like`` with
Hugging Face's random init, and its FFN weights x ``--ffn-scale`` (default 8) so that the FFNs
matter (at std 0.02 a random encoder is its residual path, and pruning costs nothing to recover).
The "sentences" are random token ids with random lengths (attention masks padded at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from transformer_models import bert_like, sample_inputs_for, token_feeds  # noqa: E402

import graphslim  # noqa: E402
from graphslim.core.data import Dataset  # noqa: E402
from graphslim.core.ir import model_bytes  # noqa: E402
from graphslim.core.metrics import Evaluator  # noqa: E402
from graphslim.pipeline.registry import registered_passes  # noqa: E402

#: The structured pruning of the pruned rows: half the heads, half the FFN inner dims.
PRUNING = ["prune-heads{ratio=0.5}", "prune-channels{ratio=0.5}"]
RESULTS = ROOT / "benchmarks" / "results"


def token_data(model: onnx.ModelProto, n: int, seq: int, seed: int) -> Dataset:
    return Dataset(token_feeds(model, n, seq, seed))


def encoder(a: argparse.Namespace) -> onnx.ModelProto:
    m = bert_like(hidden=a.hidden, heads=a.heads, layers=a.layers, ffn=a.ffn, vocab=a.vocab, max_positions=a.seq)
    for init in m.graph.initializer:
        if ".intermediate.dense.weight" in init.name or (
            ".output.dense.weight" in init.name and "attention" not in init.name
        ):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * a.ffn_scale, init.name))
    return m


def pruning_pipeline() -> tuple[str, str | None]:
    """PRUNING without the passes this build does not have, and a note saying which."""
    have = registered_passes()
    kept = [p for p in PRUNING if p.split("{")[0] in have]
    missing = [p.split("{")[0] for p in PRUNING if p.split("{")[0] not in have]
    note = f"{', '.join(missing)} not registered in this build: skipped" if missing else None
    return ",".join(kept), note


def ort_quantize_dynamic(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (tmp / "f.onnx").write_bytes(model_bytes(model))
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(tmp / "f.onnx", tmp / "q.onnx", weight_type=QuantType.QInt8)
    return onnx.load(str(tmp / "q.onnx"))


def encoder_params(model: onnx.ModelProto) -> int:
    """Elements of the encoder layers' weights (names from the export; int8 copies count too)."""
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.name.startswith("encoder.layer."))


def latencies(models: dict[str, onnx.ModelProto], seq: int, rounds: int, ref: str) -> dict[str, dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sessions = {
        k: ort.InferenceSession(model_bytes(m), so, providers=["CPUExecutionProvider"]) for k, m in models.items()
    }
    out: dict[str, dict] = {k: {} for k in models}
    any_model = next(iter(models.values()))
    for batch, reps in ((1, 10), (16, 3)):
        feeds = sample_inputs_for(any_model, batch, seq, seed=11)
        feeds["attention_mask"][:] = 1
        ms: dict[str, list[float]] = {k: [] for k in models}
        ratios: dict[str, list[float]] = {k: [] for k in models}
        for s in sessions.values():
            s.run(None, feeds)  # warm up
        names = list(models)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            this = {}
            for k in order:
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    sessions[k].run(None, feeds)
                    times.append(time.perf_counter() - t0)
                this[k] = float(np.median(times)) * 1000
            for k in names:
                ms[k].append(this[k])
                ratios[k].append(this[ref] / this[k])  # speed-up: > 1 = faster than fp32
        for k in names:
            out[k][f"b{batch}"] = {"median_ms": float(np.median(ms[k])), "ratio": float(np.median(ratios[k]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--train", type=int, default=400, help="unlabelled training sentences")
    ap.add_argument("--eval", type=int, default=100, help="held-out sentences")
    ap.add_argument("--ffn-scale", type=float, default=8.0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "transformer_int8_distill.json"))
    a = ap.parse_args()

    model = encoder(a)
    train, held = token_data(model, a.train, a.seq, 1), token_data(model, a.eval, a.seq, 2)
    prune, note = pruning_pipeline()
    distill = f"distill{{epochs={a.epochs},lr={a.lr},batch_size=16}}"
    rows: dict[str, onnx.ModelProto] = {"ORT fp32 (original)": model}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(model_bytes(model))
        t0 = time.perf_counter()
        rows["ORT quantize_dynamic (QInt8)"] = ort_quantize_dynamic(model, Path(tmp))
        seconds["ORT quantize_dynamic (QInt8)"] = time.perf_counter() - t0
        pruned = f"graphslim {prune} + distill"
        pipelines = {  # name: (input row, pipeline); the last rows start from the distilled model
            "graphslim dynamic int8": (None, "quantize-int8{mode=dynamic}"),
            "graphslim static int8": (None, "quantize-int8"),
            pruned: (None, f"{prune},{distill}"),
            f"{pruned} + dynamic int8": (pruned, "quantize-int8{mode=dynamic}"),
            # 7-bit weights: what graphslim's int8 kernel runs on AVX2's byte instructions
            f"{pruned} + dynamic int8, 7-bit weights": (pruned, "quantize-int8{mode=dynamic,reduce_range=true}"),
        }
        reports = {}
        for name, (start, pipe) in pipelines.items():
            path = src
            if start is not None:
                path = Path(tmp) / "start.onnx"
                path.write_bytes(model_bytes(rows[start]))
            t0 = time.perf_counter()
            res = graphslim.optimize(
                path, None, pipeline=pipe, data=train, eval_data=held, measure_latency=False, progress=True
            )
            seconds[name] = time.perf_counter() - t0 + (seconds[start] if start else 0.0)
            rows[name], reports[name] = res.model, res.report
            print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr)
    ev = Evaluator(model, held)
    lat = latencies(rows, a.seq, a.rounds, "ORT fp32 (original)")
    base_size, base_params = len(model_bytes(model)), encoder_params(model)
    table = []
    for name, m in rows.items():
        size = len(model_bytes(m))
        table.append(
            {
                "row": name,
                "bytes": size,
                "r_bytes": size / base_size,
                "r_encoder_params": encoder_params(m) / base_params,
                "held_out_pooled_cosine": ev.score(m).value,
                "latency": lat[name],
                "seconds": seconds.get(name),
            }
        )
    ort_q = len(model_bytes(rows["ORT quantize_dynamic (QInt8)"]))
    lines = [
        f"BERT-like encoder: hidden {a.hidden}, {a.layers} layers, {a.heads} heads, FFN {a.ffn}, vocab {a.vocab}, "
        f"seq {a.seq}, FFN weights x{a.ffn_scale}; {a.train} unlabelled training sentences, {a.eval} held out"
        + (f"; {note}" if note else ""),
        "",
        "| model | bytes (vs ORT quantize_dynamic) | encoder params | held-out pooled cosine "
        "| ORT ms b1 (speed-up) | ORT ms b16 (speed-up) | graphslim s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        b1, b16 = t["latency"]["b1"], t["latency"]["b16"]
        secs = "" if t["seconds"] is None else f"{t['seconds']:.0f}"
        lines.append(
            f"| {t['row']} | {t['bytes']:,} ({t['bytes'] / ort_q:.3f}x) | {t['r_encoder_params']:.3f} "
            f"| {t['held_out_pooled_cosine']:.4f} | {b1['median_ms']:.1f} ({b1['ratio']:.2f}x) "
            f"| {b16['median_ms']:.1f} ({b16['ratio']:.2f}x) | {secs} |"
        )
    print("\n".join(lines))
    extra = {
        name: {
            "kept_float": next(
                (p["stats"].get("kept_float") for p in r["passes"] if p["name"] == "quantize-int8"), None
            ),
            "distill": next(
                (
                    {k: p["stats"].get(k) for k in ("loss", "metric", "before", "after", "best_epoch")}
                    for p in r["passes"]
                    if p["name"] == "distill"
                ),
                None,
            ),
        }
        for name, r in reports.items()
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "note": note, "rows": table, "passes": extra}, indent=2))
    print(json.dumps(extra, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
