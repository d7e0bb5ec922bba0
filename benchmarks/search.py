"""graphslim search against the best single-technique recipe, at the same accuracy budget.

For each model: the search-evaluation split picks everything (the search's trials and each
baseline's best setting); an untouched test split only reports. Baselines are the uniform
single-technique recipes (prune only, SVD only, int8 only; with --target also block sparsity
only), each swept over its setting, and the fastest setting within the budget is kept. Then the
original, the best baseline of each technique and the searched model are timed end to end, in
interleaved rounds (medians), on the runtime the search optimized for.

    python benchmarks/search.py mnist --batch 32 --clock cpu [--trials 100] [--target x86]
    python benchmarks/search.py encoder --batch 1 --clock cpu [--trials 100]

Models:
- mnist: the MNIST CNN of benchmarks/common.py (trained on the first 8,000 MNIST test images);
  the last 2,000 split into 1,000 for the search and 1,000 for the test; int8 calibrates on
  512 of the training images.
- encoder: a BERT-style encoder (tests/transformer_models.bert_like: post-norm, Erf Gelu; by
  default bert-tiny's sizes with 4 heads: 2 layers, hidden 128, FFN 512) with a mean-pooled
  classification head, trained here with torch (4,000 sequences, 5 epochs) on a synthetic token
  task (which of 4 token sets occurs most often in the sequence, 32 tokens from a vocabulary of
  256), so that accuracy means something: random-weight encoders have no redundancy to find.
  2,000 more sequences: 1,000 for the search, 1,000 for the test; int8 calibrates on 256 of the
  training sequences.

Timing: ``--clock cpu`` (single-thread CPU time) is what RESULTS.md records, because the project
machine is shared (load 8-13 on 2 cores while these ran); ``--clock wall`` times by the wall clock.

Writes benchmarks/results/search_<model>/ (the search's OUT folder, its study, the baselines) and
prints the Markdown table that benchmarks/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import RESULTS, mnist_cnn  # noqa: E402
from graphslim.passes import DEFAULT_PIPELINE  # noqa: E402

from graphslim.core.data import load_npz  # noqa: E402
from graphslim.run import optimize  # noqa: E402
from graphslim.run.options import Budgets, RunOptions, SearchOptions  # noqa: E402
from graphslim.run.search import Timing, search  # noqa: E402


def _mnist(folder: Path) -> tuple[Path, Path, Path, Path]:
    model, _ = mnist_cnn()
    ev = np.load(RESULTS / "mnist_eval.npz")
    tr = np.load(RESULTS / "mnist_train.npz")
    np.savez(folder / "search_eval.npz", input=ev["input"][:1000], labels=ev["labels"][:1000])
    np.savez(folder / "test.npz", input=ev["input"][1000:], labels=ev["labels"][1000:])
    np.savez(folder / "calib.npz", input=tr["input"][:512], labels=tr["labels"][:512])
    return model, folder / "calib.npz", folder / "search_eval.npz", folder / "test.npz"


# --------------------------------------------------------------------------- the encoder

VOCAB, SEQ, CLASSES = 256, 32, 4
EPOCHS, TRAIN_SAMPLES = 5, 4000


def _token_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of SEQ tokens; the label is which of 4 token sets (tokens 4..67 by residue mod 4;
    the other tokens are noise) occurs most often. Ties are avoided by construction."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(68, VOCAB, size=(n, SEQ))
    labels = rng.integers(0, CLASSES, size=n)
    for i in range(n):
        counts = rng.multinomial(10, [0.25] * CLASSES)
        while np.argmax(counts) != labels[i] or np.sum(counts == counts.max()) > 1:
            counts = rng.multinomial(10, [0.25] * CLASSES)
        pos = rng.permutation(SEQ)[: counts.sum()]
        toks = np.concatenate([4 + c + 4 * rng.integers(0, 16, size=k) for c, k in enumerate(counts)])
        ids[i, pos] = toks
    return ids.astype(np.int64), labels.astype(np.int64)


def _encoder(folder: Path, hidden: int, layers: int, heads: int, ffn: int) -> tuple[Path, Path, Path, Path]:
    import torch
    import transformer_models as tm
    from onnx import TensorProto, helper, numpy_helper

    path = folder / "encoder.onnx"
    x_tr, y_tr = _token_task(TRAIN_SAMPLES, 0)
    x_ev, y_ev = _token_task(2000, 1)
    mask = lambda x: np.ones_like(x)  # noqa: E731 - every token counts
    np.savez(folder / "calib.npz", input_ids=x_tr[:256], attention_mask=mask(x_tr[:256]), labels=y_tr[:256])
    np.savez(folder / "search_eval.npz", input_ids=x_ev[:1000], attention_mask=mask(x_ev[:1000]), labels=y_ev[:1000])
    np.savez(folder / "test.npz", input_ids=x_ev[1000:], attention_mask=mask(x_ev[1000:]), labels=y_ev[1000:])
    if path.exists():
        return path, folder / "calib.npz", folder / "search_eval.npz", folder / "test.npz"
    cfg = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=VOCAB, max_positions=SEQ)
    torch.manual_seed(0)
    bert = tm.hf_module("bert", **cfg).model
    head = torch.nn.Linear(hidden, CLASSES)
    params = list(bert.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    bert.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            out = bert(input_ids=xt[idx], attention_mask=torch.ones_like(xt[idx])).last_hidden_state
            loss = torch.nn.functional.cross_entropy(head(out.mean(1)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bert.eval()
        with torch.no_grad():
            xe = torch.from_numpy(x_ev[:1000])
            acc = (
                head(bert(input_ids=xe, attention_mask=torch.ones_like(xe)).last_hidden_state.mean(1)).argmax(1).numpy()
                == y_ev[:1000]
            ).mean()
        bert.train()
        print(f"encoder epoch {epoch}: loss {loss.item():.3f}, search-eval accuracy {acc:.4f}", flush=True)
    bert.eval()
    weights = {k: v.detach().numpy() for k, v in bert.state_dict().items()}
    model = tm.bert_like(tm.make_config("bert", **cfg), weights=weights)
    # Head: mean over the sequence (the mask is all ones here), then a Gemm to the classes.
    g = model.graph
    h = g.output[0].name
    g.node.extend(
        [
            helper.make_node("ReduceMean", [h], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["logits"], name="classifier", transB=1),
        ]
    )
    g.initializer.extend(
        [
            numpy_helper.from_array(head.weight.detach().numpy(), "head.weight"),
            numpy_helper.from_array(head.bias.detach().numpy(), "head.bias"),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", CLASSES]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path, folder / "calib.npz", folder / "search_eval.npz", folder / "test.npz"


# --------------------------------------------------------------------------- baselines


def _grid(budget: float, target: str | None, heads: bool) -> dict[str, list[str]]:
    prune = [f"prune-channels{{ratio={r}}}" for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    if heads:
        prune += [f"prune-heads{{ratio={h}}}" for h in (0.25, 0.5, 0.75)]
        prune += [
            f"prune-channels{{ratio={r}}},prune-heads{{ratio={h}}}" for r in (0.5, 0.75, 0.9) for h in (0.25, 0.5)
        ]
    grid = {
        "prune only": prune,
        "SVD only": [f"factorize-svd{{rank_ratio={r}}}" for r in (0.75, 0.5, 0.375, 0.25, 0.125)]
        + [f"factorize-svd{{energy={e}}}" for e in (0.99, 0.95, 0.9, 0.8)],
        "int8 only": [
            "quantize-int8{sensitivity=false}",
            f"quantize-int8{{max_drop={budget}}}",
            "quantize-int8{sensitivity=false,op_types=[Conv,Gemm]}",
        ],
    }
    if target:
        grid["block sparsity only"] = [f"sparsify-blocks{{sparsity={s},block=[16,1]}}" for s in (0.5, 0.6, 0.75, 0.9)]
    return grid


def _evaluate(model: Path, pipeline: str, train: Path, evals: Path, test: Path) -> dict:
    res = optimize(
        model,
        None,
        pipeline=f"{DEFAULT_PIPELINE},{pipeline}",
        train_data=str(train),
        eval_data=str(evals),
        measure_latency=False,
    )
    test_res = optimize(
        model,
        None,
        pipeline=f"{DEFAULT_PIPELINE},{pipeline}",
        train_data=str(train),
        eval_data=str(test),
        measure_latency=False,
    )
    assert test_res.report["output"]["sha256"] == res.report["output"]["sha256"]
    return {
        "pipeline": pipeline,
        "model": res.model,
        "drop": res.report["accuracy"]["drop_points"],
        "accuracy": res.report["accuracy"]["after"],
        "test_accuracy": test_res.report["accuracy"]["after"],
        "test_drop": test_res.report["accuracy"]["drop_points"],
        "bytes": res.report["after"]["size_bytes"],
        "macs": res.report["after"]["macs"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=("mnist", "encoder"))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    # bert-tiny's sizes (Turc et al. 2019: 2 layers, hidden 128, 2 heads, FFN 512), 4 heads here.
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--fresh", action="store_true", help="start a new study (remove the old folder)")
    args = ap.parse_args()
    size = f"{args.hidden}" if args.model == "encoder" and args.hidden != 128 else ""  # the larger encoder
    tag = f"{args.model}{size}_b{args.batch}" + (f"_{args.target}" if args.target else "") + f"_{args.clock}"
    folder = RESULTS / f"search_{tag}"
    if args.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if args.model == "mnist":
        model, train, evals, test = _mnist(folder)
    else:
        model, train, evals, test = _encoder(folder, args.hidden, args.layers, args.heads, args.ffn)
    t0 = time.time()
    # Baselines: every setting of each technique, the fastest within the budget kept.
    rows = []
    for technique, pipes in _grid(args.budget, args.target, args.model == "encoder").items():
        for p in pipes:
            r = _evaluate(model, p, train, evals, test)
            r["technique"] = technique
            rows.append(r)
            print(f"{technique:20s} {p:60s} drop {r['drop']:+.2f} test drop {r['test_drop']:+.2f}", flush=True)
    baseline_seconds = time.time() - t0
    sample = load_npz(str(evals), onnx.load(str(model))).take(args.batch)
    rows_ok = [r for r in rows if r["drop"] <= args.budget]
    timing = Timing(args.target, args.threads, args.clock)
    times = timing.interleaved([timing.runner(r["model"], sample) for r in rows_ok], rounds=7, runs=15)
    for r, ms in zip(rows_ok, times, strict=True):
        r["ms_sweep"] = ms
    best = {}
    for r in rows_ok:
        if r["technique"] not in best or r["ms_sweep"] < best[r["technique"]]["ms_sweep"]:
            best[r["technique"]] = r
    # The search.
    t1 = time.time()
    run = RunOptions(
        train_data=str(train), eval_data=str(evals), budgets=Budgets(max_accuracy_drop=args.budget), progress=True
    )
    run = RunOptions.build(run, target=args.target) if args.target else run
    opts = SearchOptions(
        run=run, objective="latency", trials=args.trials, batch=args.batch, threads=args.threads, clock=args.clock
    )
    res = search(model, folder / "out", opts)
    search_seconds = time.time() - t1
    sec = res.report["search"]
    chosen = sec["chosen"]
    searched = (
        _evaluate(model, chosen["pipeline"].removeprefix(DEFAULT_PIPELINE).lstrip(","), train, evals, test)
        if chosen["trial"] is not None
        else None
    )
    # Final timing: original, the best of each technique, the searched model; interleaved.
    orig = _evaluate(model, "eliminate-dead-nodes", train, evals, test)
    entries = [("original", orig)] + [(f"best {k}", v) for k, v in best.items()]
    if searched is not None:
        entries.append(("searched", searched))
    final = timing.interleaved([timing.runner(e["model"], sample) for _, e in entries], rounds=15, runs=30)
    out = {
        "model": args.model,
        "batch": args.batch,
        "runtime": sec["runtime"],
        "budget": args.budget,
        "trials": sec["trials"],
        "evaluations": sec["evaluations"],
        "sensitivity_evaluations": sec["sensitivity"]["evaluations"],
        "search_seconds": round(search_seconds, 1),
        "baseline_seconds": round(baseline_seconds, 1),
        "rows": [
            {
                "name": name,
                "pipeline": e["pipeline"],
                "drop": e["drop"],
                "accuracy": e["accuracy"],
                "test_accuracy": e["test_accuracy"],
                "test_drop": e["test_drop"],
                "bytes": e["bytes"],
                "macs": e["macs"],
                "ms": ms,
            }
            for (name, e), ms in zip(entries, final, strict=True)
        ],
        "sweep": [{k: v for k, v in r.items() if k != "model"} for r in rows],
    }
    (folder / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.copy(folder / "out" / "pareto.png", Path(__file__).resolve().parent / f"search_{tag}_pareto.png")
    base_ms = out["rows"][0]["ms"]
    best_single = min((r for r in out["rows"] if r["name"].startswith("best ")), key=lambda r: r["ms"], default=None)
    print()
    print(
        f"| model | accuracy (search split) | drop | test accuracy | bytes | MACs | {sec['runtime']} ms b{args.batch} | vs original |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(
            f"| {r['name']}: `{r['pipeline']}` | {r['accuracy']:.4f} | {r['drop']:+.2f} | {r['test_accuracy']:.4f} | "
            f"{r['bytes']:,} | {r['macs']:,} | {r['ms']:.4f} | {base_ms / r['ms']:.2f}x |"
        )
    if best_single and searched is not None:
        s_ms = out["rows"][-1]["ms"]
        print(f"\nsearched vs best single technique ({best_single['name']}): {best_single['ms'] / s_ms:.2f}x")
    print(
        f"search: {sec['trials']} trials ({sec['evaluations']} evaluated) + {sec['sensitivity']['evaluations']} "
        f"sensitivity candidates on {sec['sensitivity']['samples']} samples, {search_seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
