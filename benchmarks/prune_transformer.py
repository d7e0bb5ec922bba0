"""Structured pruning of a BERT-style encoder: how much is prunable, how long pruning takes, and the
output fidelity before any fine-tuning at head/FFN ratios 0.25 and 0.5.

    python benchmarks/prune_transformer.py [--hidden 256 --layers 4 --heads 8 --ffn 1024 --seq 128]
                                           [--hf]   # a Hugging Face export instead of the onnx.helper twin

Fidelity is the cosine of mask-weighted mean-pooled ``last_hidden_state`` (how encoders are
judged) against the unpruned model, on held-out random token sequences with padding; the models
have random weights (no model hub is reachable here), so the figures describe the method on this
architecture, not a pretrained checkpoint. Times are medians of 3 runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import transformer_models as tm  # noqa: E402

from graphslim.analysis.channels import channel_groups  # noqa: E402
from graphslim.core.data import Dataset  # noqa: E402
from graphslim.core.ir import Graph  # noqa: E402
from graphslim.core.runtime import ort_session  # noqa: E402
from graphslim.pipeline import PassContext, PassManager  # noqa: E402


def _graph(model: onnx.ModelProto) -> Graph:
    g = Graph.from_model(onnx.shape_inference.infer_shapes(model))
    g.infer_shapes()
    return g


def prunable_fraction(model: onnx.ModelProto) -> dict[str, float]:
    """Fraction of the parameters whose tensors a prunable group of each kind touches."""
    g = _graph(model)
    an = channel_groups(g)
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    out = {}
    for kind in ("heads", "channels", "hidden"):
        touched: dict[int, int] = {}
        for grp in an.groups:
            if grp.kind == kind and grp.prunable:
                for _, u in an.group_uses(grp):
                    t = u.node.inputs[u.index]
                    touched[id(t)] = int(g.constant(t).size)
        out[kind] = sum(touched.values()) / total
    return out


def pooled_cosine(ref: onnx.ModelProto, new: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    a = ort_session(ref).run(None, feeds)[0]
    b = ort_session(new).run(None, feeds)[0]
    return tm.pooled_cosine(a, b, feeds.get("attention_mask"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="use a Hugging Face export (needs torch, transformers)")
    args = ap.parse_args()
    cfg = dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.heads,
        ffn=args.ffn,
        vocab=2048,
        max_positions=max(128, args.seq),
    )
    model = tm.export_hf("bert", **cfg) if args.hf else tm.bert_like(tm.make_config("bert", **cfg))
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    print(f"BERT-style encoder ({'HF export' if args.hf else 'onnx.helper twin'}): {cfg}, {params:,} parameters")
    frac = prunable_fraction(model)
    print("prunable fraction of the parameters: " + ", ".join(f"{k} {v:.1%}" for k, v in frac.items()))
    calib = Dataset(tm.sample_inputs_for(model, batch=32, seq=args.seq, seed=1))
    held_out = tm.sample_inputs_for(model, batch=16, seq=args.seq, seed=2)
    print(f"{'pipeline':<92} {'r_params':>8} {'prune s':>8} {'cosine':>7}")
    for heads, ffn in ((0.25, 0.25), (0.5, 0.5)):
        for criterion, data in (("l2", None), ("activation", calib)):
            pipe = (
                f"prune-heads{{ratio={heads},criterion={criterion}}},"
                f"prune-channels{{ratio={ffn},criterion={'l2' if criterion == 'l2' else 'activation'}}}"
            )
            times, out = [], None
            for _ in range(3):
                g = _graph(model)
                t0 = time.perf_counter()
                PassManager(pipe).run(g, PassContext(data=data))
                times.append(time.perf_counter() - t0)
                out = g.to_model()
            new_params = sum(
                int(np.prod(i.dims)) for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
            )
            cos = pooled_cosine(model, out, held_out)
            print(f"{pipe:<92} {new_params / params:>8.3f} {statistics.median(times):>8.2f} {cos:>7.4f}")


if __name__ == "__main__":
    main()
