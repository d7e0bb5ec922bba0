"""The headline numbers in one command: baselines against graphslim pipelines, as a Markdown table.

Models: the bundled digits example (accuracy on its 497 held-out images), the MNIST CNN
(../shared/data/mnist, trained here on the first 8,000 images, evaluated on the last 2,000), and a
ResNet-style CIFAR-sized network with random weights on synthetic inputs (for latency; its
"accuracy" column is top-1 agreement with the original).
Baselines: ONNX Runtime fp32 on the original, and ONNX Runtime int8 made by
onnxruntime.quantization.quantize_static on the original (QDQ, default settings, calibrated on
the same data). graphslim pipelines: prune only, svd only, int8 only, prune + distill,
prune + distill + int8. Columns: r (parameters), bytes on disk, MACs, accuracy, ORT latency at
batch 1 and 32 (median of up to 200 runs) and the speed-up over ORT fp32 on the original (> 1 =
faster). The last row per model is the last pipeline compiled with TVM for the host (graphslim's
schedules and kernels, untuned), timed in its own process by `graphslim bench --baseline`,
interleaved with ORT fp32 on the original: its speed-up is the median of per-round ratios.

    pip install -e ".[training,examples]"   # distill rows need the training extra
    python benchmarks/run.py [--out benchmarks/results/headline.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, digits_example, has_training, measure, mnist_cnn, resnet_cifar  # noqa: E402

from graphslim.analysis.cost import cost_model  # noqa: E402
from graphslim.core.data import load_data  # noqa: E402
from graphslim.core.ir import Graph, load_model, model_bytes  # noqa: E402
from graphslim.core.runtime import run_model  # noqa: E402
from graphslim.run import optimize  # noqa: E402

CANON = "fold-batchnorm,eliminate-identity"


def pipelines(distill_epochs: int) -> dict[str, str]:
    d = f"distill{{epochs={distill_epochs}}}"
    return {
        "graphslim prune 50%": f"{CANON},prune-channels{{ratio=0.5}}",
        "graphslim svd (energy 0.9)": f"{CANON},factorize-svd{{energy=0.9}}",
        "graphslim int8": f"{CANON},quantize-int8",
        "graphslim prune 50% + distill": f"{CANON},prune-channels{{ratio=0.5}},{d}",
        "graphslim prune 50% + distill + int8": f"{CANON},prune-channels{{ratio=0.5}},{d},quantize-int8",
    }


def ort_int8_baseline(model_path: Path, data) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter([data.slice(i, i + 32).inputs for i in range(0, min(len(data), 256), 32)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ)
        return onnx.load(str(out))


def bench_model(
    title: str, model_path: Path, data_path: Path, train_path: Path | None, epochs: int, training: bool
) -> list[str]:
    """One model's table: the baselines, then each graphslim pipeline."""
    original = load_model(model_path)
    data = load_data(data_path, original)
    has_labels = data.labels is not None
    ref = run_model(original, data)[0]
    truth = data.labels if has_labels else np.argmax(ref, 1)
    base_cost = cost_model(Graph.from_model(original))
    base_lat: dict[int, float] = {}
    rows = []

    def add(name: str, model: onnx.ModelProto) -> None:
        g = Graph.from_model(model)
        g.infer_shapes()
        c = cost_model(g)
        lat = measure(model, data)
        base_lat.update({k: v for k, v in lat.items() if k not in base_lat})  # the first row is the baseline
        quality = float(np.mean(np.argmax(run_model(model, data)[0], 1) == truth))
        rows.append(
            f"| {name} | {c.params / base_cost.params:.3f} | {len(model_bytes(model)):,} | {c.macs:,} | "
            f"{quality:.4f} | {lat[1]:.3f} ({base_lat[1] / lat[1]:.2f}x) | "
            f"{lat[32]:.3f} ({base_lat[32] / lat[32]:.2f}x) |"
        )

    add("ORT fp32 (original)", original)
    add("ORT int8 (quantize_static on the original)", ort_int8_baseline(model_path, data))
    last = None
    for name, pipe in pipelines(epochs).items():
        if "distill" in pipe and not training:
            continue
        res = optimize(
            model_path,
            None,
            pipeline=pipe,
            train_data=train_path or data_path,
            eval_data=data_path,
            measure_latency=False,
        )
        add(name, res.model)
        last = (name, res.model)
    if last is not None and tvm_available():
        rows.append(tvm_row(f"{last[0]}, TVM x86", last[1], data_path, model_path, base_lat, base_cost.params))
    metric = "accuracy" if has_labels else "top-1 agreement"
    return [
        f"### {title}",
        "",
        f"| pipeline | r (params) | bytes | MACs | {metric} | ms b1 (speed-up vs ORT fp32) | ms b32 (speed-up vs ORT fp32) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def tvm_available() -> bool:
    try:
        import tvm  # noqa: F401

        return True
    except ImportError:
        return False


def tvm_row(
    name: str, model: onnx.ModelProto, data_path: Path, original: Path, base_lat: dict[int, float], base_params: int
) -> str:
    """Compile for the host at batch 1 and 32 and time each in its own process (TVM's thread
    pool would slow ONNX Runtime afterwards in this one)."""
    import json
    import subprocess

    from graphslim.backend import compile_model

    lat, speed, quality = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for b in (1, 32):
            folder = Path(tmp) / f"b{b}"
            compile_model(model, "x86", folder, batch=b)
            # interleaved with ORT fp32 on the original in one process, same inputs: the speed-up is
            # the median of per-round ratios (robust to the machine's load)
            out = subprocess.run(
                [sys.executable, "-m", "graphslim.cli", "bench", str(folder), "--baseline", str(original)]
                + ["--repeat", "200", "--rounds", "10", "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            row = next(r for r in json.loads(out.stdout)["results"] if r["what"] == "model")
            lat[b], speed[b] = row["median_ms"], 1.0 / row["vs_baseline"]
            if b == 32:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "graphslim.cli",
                        "run",
                        str(folder),
                        "--data",
                        str(data_path),
                        "--reference",
                        str(original),
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res = json.loads(out.stdout)
                quality = res["accuracy"] if res.get("accuracy") is not None else res["fidelity"]["top1_agreement"]
    q = f"{quality:.4f}" if quality is not None else "-"
    c = cost_model(_graph(model))
    return (
        f"| {name} | {c.params / base_params:.3f} | {len(model_bytes(model)):,} | {c.macs:,} | {q} | "
        f"{lat[1]:.3f} ({speed[1]:.2f}x) | {lat[32]:.3f} ({speed[32]:.2f}x) |"
    )


def _graph(model: onnx.ModelProto) -> Graph:
    g = Graph.from_model(model)
    g.infer_shapes()
    return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "headline.md"))
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    models = {"digits CNN (bundled example)": (*digits_example(), None)}
    try:
        mp, ev = mnist_cnn()
        models["MNIST CNN"] = (mp, ev, RESULTS / "mnist_train.npz")
    except SystemExit as e:
        print(f"skipping MNIST: {e}")
    models["ResNet-style CIFAR net (random weights, synthetic inputs)"] = (*resnet_cifar(), None)
    training = has_training()
    lines = [
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}; "
        f"ORT latency = median ms of up to 200 runs; distill {args.epochs} epochs."
        + ("" if training else " Distill rows skipped: the training extra is not installed."),
        "",
    ]
    for title, (model_path, data_path, train_path) in models.items():
        block = bench_model(title, model_path, data_path, train_path, args.epochs, training)
        print("\n".join(block), flush=True)
        lines += block
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
