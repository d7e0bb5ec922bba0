"""Weight compression passes alone and combined: size, accuracy and ONNX Runtime latency.

For the bundled digits example and the MNIST CNN (../shared/data/mnist: first 8,000 images train,
last 2,000 evaluate), prints a Markdown table per model: parameters, bytes on disk, r (parameters
and bytes, compressed / original), top-1 accuracy, and ORT latency (median of repeated runs, all
graph optimizations on) at batch 1 and 32 with the ratio to the original. No fine-tuning here:
these are the raw costs of each pass (the distillation issue recovers accuracy).

    pip install -e ".[examples]"    # torch, to train the MNIST CNN once
    python benchmarks/compress.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import example_and_mnist  # noqa: E402

from graphslim.backend.bench import measure_ort  # noqa: E402
from graphslim.core.data import load_npz  # noqa: E402
from graphslim.core.ir import load_model  # noqa: E402
from graphslim.run import optimize  # noqa: E402

CANON = "fold-batchnorm,eliminate-identity"
PIPELINES = {
    "original": None,
    "canonicalize": CANON,
    "prune-channels 30%": f"{CANON},prune-channels{{ratio=0.3}}",
    "prune-channels 50%": f"{CANON},prune-channels{{ratio=0.5}}",
    "factorize-svd energy 0.9": f"{CANON},factorize-svd{{energy=0.9}}",
    "factorize-svd rank_ratio 0.25": f"{CANON},factorize-svd{{rank_ratio=0.25}}",
    "sparsify-blocks 50% 1x4": f"{CANON},sparsify-blocks{{sparsity=0.5}}",
    "sparsify-blocks 80% 1x4": f"{CANON},sparsify-blocks{{sparsity=0.8}}",
    "quantize-int8 static": f"{CANON},quantize-int8",
    "quantize-int8 dynamic": f"{CANON},quantize-int8{{mode=dynamic}}",
    "quantize-binary": f"{CANON},quantize-binary",
    "prune 30% + svd 0.9 + int8": f"{CANON},prune-channels{{ratio=0.3}},factorize-svd{{energy=0.9}},quantize-int8",
}


def main() -> None:
    models = example_and_mnist()
    for title, (model_path, data_path) in models.items():
        original = load_model(model_path)
        data = load_npz(data_path, original)
        base_lat = {b: measure_ort(original, data, batch=b, repeat=200, max_seconds=10) for b in (1, 32)}
        print(f"\n### {title}\n")
        print("| pipeline | params | bytes | r params | r bytes | accuracy | ORT ms b1 (ratio) | ORT ms b32 (ratio) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, pipe in PIPELINES.items():
            if pipe is None:
                res = optimize(model_path, None, pipeline="fold-constants", data=data, measure_latency=False)
                model, rep = original, res.report
                params, size, acc = rep["before"]["params"], rep["before"]["size_bytes"], rep["accuracy"]["before"]
                rp = rb = 1.0
                lat = base_lat
            else:
                res = optimize(model_path, None, pipeline=pipe, data=data, measure_latency=False)
                model, rep = res.model, res.report
                params, size, acc = rep["after"]["params"], rep["after"]["size_bytes"], rep["accuracy"]["after"]
                rp, rb = rep["compression"]["r_params"], rep["compression"]["r_bytes"]
                lat = {b: measure_ort(model, data, batch=b, repeat=200, max_seconds=10) for b in (1, 32)}
            cells = [
                f"{lat[b]['median_ms']:.3f} ({lat[b]['median_ms'] / base_lat[b]['median_ms']:.2f}x)" for b in (1, 32)
            ]
            print(f"| {name} | {params:,} | {size:,} | {rp:.3f} | {rb:.3f} | {acc:.4f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
