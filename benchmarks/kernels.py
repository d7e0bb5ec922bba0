"""Compression-aware kernels against the dense path, in one run on this machine.

1. BSR dense kernel (graphslim.kernels.sparse) vs graphslim's dense TVM matmul schedule vs numpy
   vs ONNX Runtime (MatMul), for a 1024x1024 weight at 0/50/80/90/95% block sparsity, blocks
   1x4, 4x4 and 16x1, batch 1 and 32. Ratios are against the dense TVM kernel and against ORT.
2. The int8 kernel (QDQ MatMul/Gemm, AVX2 vpmaddwd) vs graphslim's fp32 TVM kernel vs ORT fp32
   MatMul vs ORT MatMulInteger (uint8 x int8), 1024x1024, batch 1 and 32; the binary-weight
   kernel (quantize-binary layers) vs the same fp32 kernels.
3. End to end: ORT on the original vs ORT on the compressed model vs TVM (graphslim compile,
   host CPU, default schedules plus the rewrites) on the compressed model, for the MNIST CNN
   (trained where torch and ../shared/data/mnist exist, else random weights) and the
   ResNet-style CIFAR net, batch 1; compressed = prune-channels 50% + sparsify-blocks 90% (16x1)
   of the Gemm layers or of all layers, or prune-channels 50% + quantize-int8, or
   prune-channels 50% + quantize-binary.

Medians of repeated runs; numpy and ORT are timed before TVM runs in this process (TVM's thread
pool slows them otherwise), the end-to-end numbers come from ``graphslim bench`` processes.

    pip install -e ".[ort,tvm]"
    python benchmarks/kernels.py [--out benchmarks/results/kernels.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, resnet_cifar  # noqa: E402
from tvm_backend import graphslim, mnist_model  # noqa: E402

BLOCKS = ((1, 4), (4, 4), (16, 1))
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
N = K = 1024


def block_sparse(block: tuple[int, int], sparsity: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random((N // block[0], K // block[1])) >= sparsity
    mask = np.repeat(np.repeat(keep, block[0], 0), block[1], 1)
    return (rng.standard_normal((N, K)) * mask).astype(np.float32)


def median_ms(fn, repeat: int = 200, max_s: float = 3.0) -> float:
    for _ in range(10):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def ort_matmul_ms(w: np.ndarray, x: np.ndarray) -> float:
    import onnxruntime as ort

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], N])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return median_ms(lambda: sess.run(None, {"x": x}))


def kernel_table(batches: list[int]) -> list[str]:
    import tvm
    from graphslim.kernels.sparse import bsr_dense_func, to_bsr

    from graphslim.backend.threads import available_cpus, use_threads

    use_threads(len(available_cpus()))  # all CPUs, as these tables were measured
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    rows = []
    # numpy and ORT first (see module docstring), TVM afterwards
    cases = [(b, block, s) for b in batches for block in BLOCKS for s in SPARSITIES]
    rng = np.random.default_rng(1)
    xs = {b: rng.standard_normal((b, K)).astype(np.float32) for b in batches}
    ref_ms = {}
    for b, block, s in cases:
        w, x_b = block_sparse(block, s), xs[b]
        ref_ms[(b, block, s)] = (median_ms(lambda w=w, x_b=x_b: x_b @ w.T), ort_matmul_ms(w, x_b))
    dense_ms = {b: _tvm_dense_ms(b, target) for b in batches}
    for b, block, s in cases:
        w = block_sparse(block, s)
        data, indices, indptr = to_bsr(w, block)
        if len(indices) == 0:
            data, indices = np.zeros((1, block[1], block[0]), np.float32), np.zeros(1, np.int32)
        lib = tvm.tirx.build(
            bsr_dense_func(b, K, N, block, len(indices)).with_attr("global_symbol", "main"), target=target
        )
        y = tvm.runtime.tensor(np.zeros((b, N), np.float32))
        args = [tvm.runtime.tensor(a) for a in (xs[b], data, indices, indptr, np.zeros(N, np.float32))] + [y]
        lib["main"](*args)
        np.testing.assert_allclose(y.numpy(), xs[b] @ w.T, rtol=1e-3, atol=1e-3)
        bsr = lib.time_evaluator("main", tvm.cpu(), number=20, repeat=7)(*args).median * 1e3
        np_ms, ort_ms = ref_ms[(b, block, s)]
        rows.append(
            f"| {b} | {block[0]}x{block[1]} | {s:.0%} | {bsr:.4f} | {dense_ms[b]:.4f} | {np_ms:.4f} | "
            f"{ort_ms:.4f} | {dense_ms[b] / bsr:.2f}x | {ort_ms / bsr:.2f}x |"
        )
        print(rows[-1], flush=True)
    return [
        "| batch | block | block sparsity | BSR ms | TVM dense ms | numpy ms | ORT ms | BSR speed-up vs "
        "TVM dense | vs ORT |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def int8_table(batches: list[int]) -> list[str]:
    """int8 kernel (QDQ layers) vs fp32 kernels, 1024x1024: TVM int8 (vpmaddwd) vs graphslim's
    dense fp32 TVM kernel vs ORT fp32 MatMul vs ORT MatMulInteger (uint8 x int8)."""
    import onnxruntime as ort
    import tvm
    from graphslim.kernels.int8 import dense_tile, isa_for, pack_weights, qdense_func

    from graphslim.backend.threads import available_cpus, use_threads

    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (N, K)).astype(np.int8)
    ort_ms = {}
    for b in batches:
        q = rng.integers(0, 256, (b, K)).astype(np.uint8)
        g = helper.make_graph(
            [helper.make_node("MatMulInteger", ["q", "w"], ["y"])],
            "mmi",
            [helper.make_tensor_value_info("q", TensorProto.UINT8, [b, K])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [b, N])],
            [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        ort_ms[b] = (
            ort_matmul_ms(w.astype(np.float32), q.astype(np.float32)),
            median_ms(lambda sess=sess, q=q: sess.run(None, {"q": q})),
        )
    use_threads(len(available_cpus()))  # all CPUs, as these tables were measured
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    rows = []
    for b in batches:
        q = rng.integers(0, 256, (b, K)).astype(np.uint8)
        isa = isa_for(target)
        _, lanes, g = dense_tile(b, N, isa)
        func, packed = qdense_func(b, K, N, "uint8", isa), pack_weights(w, lanes * g, isa)
        lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)
        y = tvm.runtime.tensor(np.zeros((b, N), np.float32))
        args = [
            tvm.runtime.tensor(a)
            for a in (q, packed, np.ones(N, np.float32), np.zeros(N, np.float32), np.zeros(N, np.float32))
        ]
        lib["main"](*args, y)
        assert np.array_equal(y.numpy(), (q.astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32))
        int8 = lib.time_evaluator("main", tvm.cpu(), number=20, repeat=7)(*args, y).median * 1e3
        fp32 = _tvm_dense_ms(b, target)
        o32, o8 = ort_ms[b]
        rows.append(
            f"| {b} | {int8:.4f} | {fp32:.4f} | {o32:.4f} | {o8:.4f} | {fp32 / int8:.2f}x | {o32 / int8:.2f}x | "
            f"{o8 / int8:.2f}x |"
        )
        print(rows[-1], flush=True)
    isa = "AVX-512 VNNI (vpdpbusd)" if isa_for(target).name == "vnni" else "AVX2 (vpmaddwd)"
    return [
        f"int8 kernel: {isa}, target {target.attrs.get('mcpu', '')}.",
        "",
        "| batch | TVM int8 ms | TVM fp32 ms | ORT fp32 ms | ORT MatMulInteger ms | int8 vs TVM fp32 | vs ORT fp32 "
        "| vs ORT int8 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def binary_table(batches: list[int]) -> list[str]:
    """Binary-weight kernel (1-bit packed weights, float activations) vs graphslim's fp32 TVM
    kernel vs ORT fp32 MatMul on the same +-alpha weight, 1024x1024."""
    import tvm
    from graphslim.kernels.binary import (
        _groups,
        _row_tile,
        binary_dense_func,
        decode_table,
        lanes_for,
        pack_signs,
        split_binary,
    )

    from graphslim.backend.threads import available_cpus, use_threads

    rng = np.random.default_rng(4)
    w = (np.where(rng.random((N, K)) < 0.5, -1.0, 1.0) * rng.uniform(0.1, 1.0, (N, 1))).astype(np.float32)
    negative, alpha = split_binary(w)
    xs = {b: rng.standard_normal((b, K)).astype(np.float32) for b in batches}
    ort_ms = {b: ort_matmul_ms(w, xs[b]) for b in batches}
    use_threads(len(available_cpus()))  # all CPUs, as these tables were measured
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    rows = []
    for b in batches:
        lanes = lanes_for(target, N)
        groups = _groups(N, _row_tile(b), lanes)
        lib = tvm.tirx.build(
            binary_dense_func(b, K, N, groups, lanes=lanes).with_attr("global_symbol", "main"), target=target
        )
        y = tvm.runtime.tensor(np.zeros((b, N), np.float32))
        args = [
            tvm.runtime.tensor(a)
            for a in (xs[b], pack_signs(negative, groups, lanes), decode_table(lanes), alpha, np.zeros(N, np.float32))
        ]
        lib["main"](*args, y)
        np.testing.assert_allclose(y.numpy(), xs[b] @ w.T, rtol=1e-4, atol=1e-3)
        dense = _tvm_dense_timer(b, target)
        # alternate the two kernels (this machine's speed drifts by up to ~1.5x between minutes):
        # the ratio is the median of the per-round ratios
        rounds = [
            (lib.time_evaluator("main", tvm.cpu(), number=20, repeat=3)(*args, y).median * 1e3, dense(3))
            for _ in range(7)
        ]
        binary, fp32 = (float(np.median([r[i] for r in rounds])) for i in (0, 1))
        ratio = float(np.median([d / bn for bn, d in rounds]))
        rows.append(f"| {b} | {binary:.4f} | {fp32:.4f} | {ort_ms[b]:.4f} | {ratio:.2f}x | {ort_ms[b] / binary:.2f}x |")
        print(rows[-1], flush=True)
    how = "16-lane words decoded in mask registers (AVX-512)" if lanes_for(target, N) == 16 else "byte table (8 lanes)"
    return [
        f"Weights: 1 bit each (128 KiB) against 4 MiB of fp32; {how}. The two TVM kernels alternate in 7 "
        "rounds; the ratio is the median of the rounds' ratios.",
        "",
        "| batch | TVM binary ms | TVM fp32 ms | ORT fp32 ms | binary vs TVM fp32 | vs ORT fp32 |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _tvm_dense_ms(b: int, target) -> float:
    """graphslim's fp32 dense schedule for [b, K] x [K, N]: median ms."""
    return _tvm_dense_timer(b, target)(7)


def _tvm_dense_timer(b: int, target):
    """A function ``(repeat) -> median ms`` timing graphslim's fp32 dense schedule for [b, K] x [K, N]."""
    import tvm
    from graphslim.kernels.pipeline import apply_schedule_rules
    from graphslim.kernels.schedules import default_cpu_rules
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((b, K), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.matmul(x, relax.const(np.zeros((K, N), np.float32))))
        bb.emit_func_output(out)
    with target:
        mod = tvm.transform.Sequential(cpu.legalize_passes(target))(bb.get())
        mod = apply_schedule_rules(mod, target, default_cpu_rules())
    name = next(gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    lib = tvm.tirx.build(mod[name].with_attr("global_symbol", "main"), target=target)
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal((b, K)).astype(np.float32)),
        tvm.runtime.tensor(rng.standard_normal((K, N)).astype(np.float32)),
        tvm.runtime.tensor(np.zeros((b, N), np.float32)),
    ]
    return lambda repeat: lib.time_evaluator("main", tvm.cpu(), number=20, repeat=repeat)(*args).median * 1e3


def end_to_end(repeat: int) -> list[str]:
    path, how = mnist_model()
    models = {f"MNIST CNN ({how})": path, "ResNet-style CIFAR net": resnet_cifar()[0]}
    pipelines = {
        "prune 50% + BSR (sparsify-blocks 90% 16x1, Gemm)": "fold-batchnorm,prune-channels{ratio=0.5},sparsify-blocks{sparsity=0.9,block=[16,1],ops=[Gemm]}",
        "prune 50% + BSR (sparsify-blocks 90% 16x1, Conv and Gemm)": "fold-batchnorm,prune-channels{ratio=0.5},sparsify-blocks{sparsity=0.9,block=[16,1]}",
        "prune 50% + int8 (quantize-int8, QDQ)": "fold-batchnorm,prune-channels{ratio=0.5},quantize-int8",
        "prune 50% + binary (quantize-binary)": "fold-batchnorm,prune-channels{ratio=0.5},quantize-binary",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            m = onnx.load(str(model))
            shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
            calib = Path(tmp) / f"{model.stem}_calib.npz"
            np.savez(
                calib,
                **{
                    m.graph.input[0].name: np.random.default_rng(0).standard_normal([64, *shape[1:]]).astype(np.float32)
                },
            )
            for label, pipeline in pipelines.items():
                out = Path(tmp) / f"{model.stem}_{len(rows)}"
                graphslim(
                    "optimize", str(model), "--passes", pipeline, "--data", str(calib), "--no-latency", "-o", str(out)
                )
                art = graphslim("compile", str(out / "model.onnx"), "--target", "x86", "-o", str(out / "compiled"))

                def bench(target: str) -> float:
                    args = ["bench", target, "--repeat", str(repeat), "--warmup", "20"]
                    extra = ["--batch", "1"] if target.endswith(".onnx") else []
                    return graphslim(*args, *extra)["results"][0]["median_ms"]

                # three rounds of the three measurements, interleaved: this machine's speed drifts
                # between minutes, so each speed-up is the median of the rounds' ratios
                rounds = [
                    (bench(str(model)), bench(str(out / "model.onnx")), bench(str(out / "compiled"))) for _ in range(3)
                ]
                ort_orig, ort_comp, tvm_comp = (float(np.median([r[i] for r in rounds])) for i in range(3))
                up_ort, up_tvm = (float(np.median([r[0] / r[i] for r in rounds])) for i in (1, 2))
                own = sum(v.startswith("kernel:") for v in art["kernel_schedules"].values())
                rows.append(
                    f"| {name} | {label} | {ort_orig:.3f} | {ort_comp:.3f} ({up_ort:.2f}x) | "
                    f"{tvm_comp:.3f} ({up_tvm:.2f}x) | {own} |"
                )
                print(rows[-1], flush=True)
    return [
        "Batch 1; speed-ups are against ORT on the original (medians of 3 interleaved rounds, each a "
        "`graphslim bench` process). Calibration data: 64 random inputs.",
        "",
        "| model | compressed by | ORT original ms | ORT compressed ms (speed-up) | TVM compressed ms (speed-up) "
        "| layers on graphslim kernels |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels.md")
    ap.add_argument("--only", choices=["bsr", "int8", "binary", "e2e"], help="run one part")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lines = []
    if args.only in (None, "e2e"):  # subprocesses: before this process starts TVM's thread pool
        lines += ["### End to end", "", *end_to_end(args.repeat), ""]
    if args.only in (None, "int8"):
        lines += ["### int8 dense kernel (QDQ layers), 1024x1024 weight", "", *int8_table(batches), ""]
    if args.only in (None, "binary"):
        lines += [
            "### Binary-weight dense kernel (quantize-binary layers), 1024x1024 weight",
            "",
            *binary_table(batches),
            "",
        ]
    if args.only in (None, "bsr"):
        lines += ["### BSR dense kernel, 1024x1024 weight", "", *kernel_table(batches)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
