"""A model over 2 GB (external data): load, prune, save, and how much memory that takes.

Builds an MLP with about 2.2 GB of float32 weights (12288 -> 16384 -> 12288 -> 12288 -> 10),
written straight to an external-data file (never one protobuf in memory), then measures in fresh
subprocesses the peak resident memory (ru_maxrss) of
  1. the library path: graphslim.load -> prune-channels{ratio=0.5} -> graphslim.save, and
  2. the command line: graphslim optimize --passes prune-channels{ratio=0.5} --no-latency (which
     also runs both models in ONNX Runtime to report fidelity),
as a multiple of the weight bytes. Needs about 12 GB of free memory and 6 GB of disk.

    python benchmarks/big_model.py [--dir /tmp/graphslim-big]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

SIZES = [12288, 16384, 12288, 12288, 10]

LIBRARY = r"""
import resource, sys, time, json
import graphslim
t0 = time.perf_counter()
model = graphslim.load(sys.argv[1])
g = graphslim.Graph.from_model(model)
del model
g.infer_shapes()
graphslim.PassManager("prune-channels{ratio=0.5}").run(g, graphslim.PassContext())
graphslim.save(g.to_model(), sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build(folder: Path) -> tuple[Path, int]:
    folder.mkdir(parents=True, exist_ok=True)
    model_path, data_name = folder / "big.onnx", "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, offset, x = [], [], 0, "input"
    with open(folder / data_name, "wb") as f:
        for i, (k, n) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
            for name, shape in ((f"w{i}", (n, k)), (f"b{i}", (n,))):
                arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(k))
                f.write(arr.tobytes())
                t = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))  # for dims only
                tp = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
                tp.data_location = TensorProto.EXTERNAL
                for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    tp.external_data.add(key=key, value=val)
                offset += arr.nbytes
                inits.append(tp)
                del arr, t
            out = "logits" if i == len(SIZES) - 2 else f"h{i}"
            nodes.append(
                helper.make_node(
                    "Gemm", [x, f"w{i}", f"b{i}"], [out + ("" if out == "logits" else "_pre")], name=f"fc{i}", transB=1
                )
            )
            if out != "logits":
                nodes.append(helper.make_node("Relu", [out + "_pre"], [out], name=f"relu{i}"))
            x = out
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SIZES[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", SIZES[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model_path.write_bytes(model.SerializeToString())
    return model_path, offset


def _peak(cmd: list[str]) -> tuple[float, int, str]:
    wrapped = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys, time; t=time.perf_counter(); "
        "r=subprocess.run(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter()-t, r.returncode)",
        *cmd,
    ]
    out = subprocess.run(wrapped, capture_output=True, text=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PEAK"))
    _, peak, secs, rc = line.split()
    return float(secs), int(peak), rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/graphslim-big")
    args = ap.parse_args()
    folder = Path(args.dir)
    t0 = time.perf_counter()
    model_path, weight_bytes = build(folder)
    print(f"built {model_path} with {weight_bytes / 2**30:.2f} GiB of weights in {time.perf_counter() - t0:.0f} s")
    secs, peak, rc = _peak([sys.executable, "-c", LIBRARY, str(model_path), str(folder / "pruned.onnx")])
    print(
        f"| library: load, prune-channels 50%, save | {secs:.1f} s | peak {peak / 2**30:.2f} GiB = "
        f"{peak / weight_bytes:.2f}x the weights | exit {rc} |"
    )
    secs, peak, rc = _peak(
        [
            sys.executable,
            "-m",
            "graphslim.cli",
            "optimize",
            str(model_path),
            "-o",
            str(folder / "out"),
            "--passes",
            "prune-channels{ratio=0.5}",
            "--no-latency",
            "-q",
        ]
    )
    print(
        f"| CLI optimize (also runs both models in ORT for fidelity) | {secs:.1f} s | peak {peak / 2**30:.2f} GiB = "
        f"{peak / weight_bytes:.2f}x the weights | exit {rc} |"
    )
    rep = json.loads((folder / "out" / "report.json").read_text())
    print(
        f"after: {rep['after']['params']:,} params (r = {rep['compression']['r_params']}), files: "
        f"{sorted(p.name for p in (folder / 'out').iterdir())}"
    )


if __name__ == "__main__":
    main()
