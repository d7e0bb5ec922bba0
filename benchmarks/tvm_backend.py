"""The TVM backend's dense path: ONNX Runtime vs TVM with graphslim's default schedules vs TVM
tuned with MetaSchedule, for the MNIST CNN and the ResNet-style CIFAR network, batch 1 and 32.

Every latency is the median of ``--repeat`` runs of ``graphslim bench`` in its own process (TVM's
thread pool and ORT's spinning threads disturb each other within one process), all in this one
run; ratios are TVM / ORT (below 1: TVM faster). ORT runs the original model with its graph
optimizations; graphslim compiles the same model (canonicalized: BatchNorm folded) for the host.
The MNIST CNN is the trained one where torch and ../shared/data/mnist exist, otherwise the same
architecture with random weights (latency does not depend on the weights).

    pip install -e ".[ort,tvm]"
    python benchmarks/tvm_backend.py [--trials 64] [--repeat 200] [--out benchmarks/results/tvm_backend.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import RESULTS, resnet_cifar  # noqa: E402


def mnist_model() -> tuple[Path, str]:
    try:
        from common import mnist_cnn

        return mnist_cnn()[0], "trained"
    except (ImportError, SystemExit, OSError) as e:
        print(f"MNIST CNN with random weights ({type(e).__name__}: {e})")
    from models import ModelBuilder

    b = ModelBuilder("mnist_cnn", (1, 1, 28, 28), 0)
    x = b.maxpool(b.relu(b.conv("input", 32, k=5, pad=0)))
    x = b.maxpool(b.relu(b.conv(x, 64, k=3, pad=0)))
    x = b.relu(b.gemm(b.flatten(x), 256))
    x = b.gemm(b.relu(b.gemm(x, 128)), 10)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mnist_cnn_random.onnx"
    onnx.save(b.build(x), str(path))
    return path, "random weights"


def graphslim(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "graphslim.cli", *args, "--json", "-q"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"graphslim {' '.join(args)} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def bench(target: str, batch: int, repeat: int) -> float:
    args = ["bench", target, "--repeat", str(repeat), "--warmup", "20"]
    if target.endswith(".onnx"):
        args += ["--batch", str(batch)]
    return graphslim(*args)["results"][0]["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model and batch (default 64)")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--out", type=Path, default=RESULTS / "tvm_backend.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    models = {}
    path, how = mnist_model()
    models[f"MNIST CNN ({how})"] = path
    models["ResNet-style CIFAR net"] = resnet_cifar()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            for batch in batches:
                base = Path(tmp) / f"{model.stem}_b{batch}"
                graphslim("compile", str(model), "--target", "x86", "--batch", str(batch), "-o", f"{base}_default")
                t0 = time.perf_counter()
                meta = (
                    graphslim(
                        "compile",
                        str(model),
                        "--target",
                        "x86",
                        "--batch",
                        str(batch),
                        "--tune",
                        str(args.trials),
                        "-o",
                        f"{base}_tuned",
                    )
                    if args.trials
                    else {"tuning": {"trials": 0, "tasks": 0}}
                )
                tune_s = time.perf_counter() - t0
                ort = bench(str(model), batch, args.repeat)
                default = bench(f"{base}_default", batch, args.repeat)
                tuned = bench(f"{base}_tuned", batch, args.repeat) if args.trials else float("nan")
                rows.append((name, batch, ort, default, tuned, meta["tuning"], tune_s))
                print(rows[-1][:5], flush=True)
    lines = [
        f"Host: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs; "
        f"TVM {json.loads(subprocess.run([sys.executable, '-c', 'import tvm, json; print(json.dumps(tvm.__version__))'], capture_output=True, text=True).stdout)}; "  # noqa: E501
        f"median of {args.repeat} runs each, one process per measurement.",
        "",
        "| model | batch | ORT ms | TVM default schedules ms (vs ORT) | TVM tuned ms (vs ORT) | tuning |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, batch, ort, default, tuned, tuning, tune_s in rows:
        lines.append(
            f"| {name} | {batch} | {ort:.3f} | {default:.3f} ({default / ort:.2f}x) | {tuned:.3f} "
            f"({tuned / ort:.2f}x) | {tuning['trials']} trials over {tuning['tasks']} kernels, "
            f"{tune_s:.0f} s build+tune |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
