"""The TVM backend: compile, export, load, run; numerics against ONNX Runtime (skipped without
the tvm extra)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE, apply, run_aarch64
from models import ARCHITECTURES, run, sample_inputs

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")

from graphslim.backend import compile_model, load_artifact  # noqa: E402
from graphslim.cli import main  # noqa: E402
from graphslim.core.errors import InputError  # noqa: E402


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("prune", [0.0, 0.5])
def test_x86_matches_onnx_runtime(arch, prune, tmp_path):
    """Every test architecture (residual, concat, depthwise, grouped, Fire, MLP), dense and with
    pruned (odd) channel counts, through graphslim's NHWC schedules: within 1e-4 of ORT, and
    every conv / matmul scheduled by the contraction rule."""
    model, _ = apply(
        ARCHITECTURES[arch](), f"fold-batchnorm,prune-channels{{ratio={prune}}}" if prune else "fold-batchnorm"
    )
    art = compile_model(model, "x86", tmp_path / "art", batch=4)
    feeds = sample_inputs(model, 4)
    got = load_artifact(art.folder)(feeds)
    for a, b in zip(run(model, feeds), got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))
    assert art.meta["inputs"][0]["shape"][0] == 4 and art.meta["tvm_target"]["kind"] == "llvm"
    assert "unscheduled" not in art.meta["schedules"], art.meta["kernel_schedules"]
    contractions = {k: v for k, v in art.meta["kernel_schedules"].items() if "conv2d" in k or "matmul" in k}
    assert contractions and set(contractions.values()) == {"ContractionCPU"}, contractions


def test_compile_and_run_commands_on_the_example(tmp_path, capsys):
    assert (
        main(
            ["compile", str(EXAMPLE / "model.onnx"), "--target", "x86", "--batch", "8", "-o", str(tmp_path / "c"), "-q"]
        )
        == 0
    )
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == [".graphslim.json", "artifact.json", "model.so", "params.bin"]
    assert (
        main(
            [
                "run",
                str(tmp_path / "c"),
                "--data",
                str(EXAMPLE / "data.npz"),
                "--reference",
                str(EXAMPLE / "model.onnx"),
                "--json",
            ]
        )
        == 0
    )
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 497 and out["accuracy"] > 0.95  # 497 = 62 batches of 8 + a padded one
    assert out["fidelity"]["max_abs_diff"] < 1e-3 and out["fidelity"]["top1_agreement"] == 1.0


def test_arm_cross_compile_is_an_aarch64_library(tmp_path):
    art = compile_model(onnx.load(str(EXAMPLE / "model.onnx")), "arm", tmp_path / "arm")
    lib = tmp_path / "arm" / art.meta["library"]
    assert lib.exists()
    if lib.suffix == ".so":
        if shutil.which("readelf") is None:
            pytest.skip("readelf not installed")
        header = subprocess.run(["readelf", "-h", str(lib)], capture_output=True, text=True).stdout
        assert "AArch64" in header and "DYN" in header
    else:
        assert art.meta["note"].startswith("aarch64-linux-gnu-gcc not found")
    with pytest.raises(InputError, match="aarch64"):
        load_artifact(tmp_path / "arm")


def test_cuda_codegen_without_a_gpu(tmp_path):
    art = compile_model(onnx.load(str(EXAMPLE / "model.onnx")), "cuda", tmp_path / "cuda")
    assert art.meta["tvm_target"] == {"kind": "cuda", "arch": "sm_80"}
    source = tmp_path / "cuda" / "model.cu"
    assert "__global__" in source.read_text()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: generated the CUDA source, did not compile it")
    r = subprocess.run(
        [nvcc, "--fatbin", "-arch=sm_80", "-o", str(tmp_path / "k.fatbin"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "k.fatbin").stat().st_size > 1000
    with pytest.raises(InputError, match="CUDA"):
        load_artifact(tmp_path / "cuda")


def test_symbolic_non_batch_dims_need_shapes(tmp_path):
    model = onnx.load(str(EXAMPLE / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(InputError, match=r"input\[2\] \('H'\).*--shape input=1x1x<H>x8"):
        compile_model(model, "x86", tmp_path / "x")


def test_optimize_with_target_compiles_and_times_the_result(tmp_path):
    import json

    assert (
        main(
            [
                "optimize",
                str(EXAMPLE / "model.onnx"),
                "-o",
                str(tmp_path / "o"),
                "--passes",
                "fold-batchnorm,prune-channels{ratio=0.3}",
                "--data",
                str(EXAMPLE / "data.npz"),
                "--target",
                "x86",
                "-q",
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["compiled"]["target"] == "x86" and rep["compiled"]["folder"] == "compiled"
    assert rep["latency"]["tvm_compiled"]["median_ms"] > 0
    runner = load_artifact(tmp_path / "o" / "compiled")
    x = np.load(EXAMPLE / "data.npz")["input"][:1]
    ref = run(onnx.load(str(tmp_path / "o" / "model.onnx")), {"input": x})[0]
    np.testing.assert_allclose(runner({"input": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_bench_compares_artifact_with_baseline(tmp_path, capsys):
    import json

    compile_model(onnx.load(str(EXAMPLE / "model.onnx")), "x86", tmp_path / "a")
    assert (
        main(
            [
                "bench",
                str(tmp_path / "a"),
                "--baseline",
                str(EXAMPLE / "model.onnx"),
                "--batch",
                "1",
                "--repeat",
                "5",
                "--warmup",
                "1",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["runtime"] for r in rows] == ["onnxruntime", "tvm (x86)"]
    ort, tvm_row = rows
    # --repeat 5: five rounds of one timed call each, interleaved. vs_baseline is the median of
    # the per-round ratios (TVM's round median / ORT's, same round), not a ratio of two medians.
    assert ort["runs"] == tvm_row["runs"] == 5 and ort["rounds"] == tvm_row["rounds"] == 5  # not --rounds' 7
    assert ort["vs_baseline"] == 1.0 and "round_ratios" not in ort
    assert len(tvm_row["round_ratios"]) == len(tvm_row["round_medians_ms"]) == len(ort["round_medians_ms"]) == 5
    for ratio, t, b in zip(tvm_row["round_ratios"], tvm_row["round_medians_ms"], ort["round_medians_ms"], strict=True):
        assert ratio == pytest.approx(t / b, rel=1e-2)  # medians are rounded to 0.1 us
    assert tvm_row["vs_baseline"] == pytest.approx(float(np.median(tvm_row["round_ratios"])), abs=1e-4)
    for r in rows:  # peak memory the model added (Linux /proc), and the process peak during it
        assert r["memory"]["peak_rss_mb"] > 10 and 0 <= r["memory"]["extra_mb"] <= r["memory"]["peak_rss_mb"]


_LOAD_AND_RUN = """
import json, sys
import numpy as np
import tvm  # imported before measuring: the library is not the model
from graphslim.backend import load_artifact
from graphslim.backend.bench import PeakMemory
with PeakMemory() as mem:
    runner = load_artifact(sys.argv[1], threads=1)
    out = runner({"x": np.ones((8, 1024), np.float32)})
print(json.dumps({**mem.result(), "sum": float(out[0].sum())}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="measures through /proc")
def test_weights_sit_beside_the_library_and_load_once(tmp_path):
    """16 MB of weights: the library holds code only, params.bin the weights (which ``main``
    takes after the input), and loading plus a first run add them to a fresh process about once
    (a library with embedded weights added about four times their size at the peak)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((1024, 1024)) / 32).astype(np.float32) for _ in range(4)]
    nodes, x = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1024])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [8, 1024])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    art = compile_model(model, "x86", tmp_path / "art")
    params = art.meta["params"]
    assert len(params["tensors"]) == 4 and params["bytes"] >= 16 * 2**20
    assert (tmp_path / "art" / "model.so").stat().st_size < 2**20
    r = subprocess.run(
        [__import__("sys").executable, "-c", _LOAD_AND_RUN, str(tmp_path / "art")],
        capture_output=True,
        text=True,
        check=True,
    )
    got = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    expect = np.ones((8, 1024), np.float32)
    for w in ws:
        expect = expect @ w
    assert got["sum"] == pytest.approx(float(expect.sum()), rel=1e-3, abs=1e-2)
    assert got["extra_mb"] < 1.4 * params["bytes"] / 2**20, got


def test_params_file_round_trips_aligned_tensors_of_every_lifted_dtype():
    from graphslim.kernels.params import ALIGN, aligned_buffer, pack, views

    rng = np.random.default_rng(0)
    values = [
        rng.integers(-128, 128, 7).astype(np.int8),
        rng.standard_normal((3, 5)).astype(np.float16),
        np.array([2**40, -3], np.int64),
        rng.standard_normal((4, 4)).astype(np.float32),
        rng.integers(0, 256, (2, 3, 1)).astype(np.uint8),
    ]
    data, entries = pack(values)
    assert all(e["offset"] % ALIGN == 0 for e in entries) and len(data) == entries[-1]["offset"] + 6
    buffer = aligned_buffer(len(data))
    buffer[:] = np.frombuffer(data, np.uint8)
    got = views(buffer, entries)
    for v, g in zip(values, got, strict=True):
        assert g.dtype == v.dtype and g.shape == v.shape and np.array_equal(g, v)
        assert g.ctypes.data % ALIGN == 0 and np.shares_memory(g, buffer)


def test_lift_constants_makes_large_constants_parameters_and_keeps_small_ones():
    import tvm
    from graphslim.kernels.params import lift_constants
    from tvm import relax

    big = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    small = np.array([1.0, 2.0], np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(big)))
            y = bb.emit(relax.op.add(y, relax.const(big[:2])))  # 512 bytes: stays
            y = bb.emit(relax.op.add(y, relax.op.reshape(relax.const(small), (2, 1))))
            out = bb.emit_output(relax.op.matmul(y, relax.const(big)))  # another constant object
        bb.emit_func_output(out)
    before = bb.get()
    after, values = lift_constants(before)
    assert [len(before["main"].params), len(after["main"].params)] == [1, 1 + len(values)]
    assert len(values) == 2 and all(np.array_equal(v, big) for v in values)  # the 512 and 8 bytes stay
    data = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    host = tvm.target.Target({"kind": "llvm"})
    run_before = relax.VirtualMachine(tvm.compile(before, host), tvm.cpu())["main"]
    run_after = relax.VirtualMachine(tvm.compile(after, host), tvm.cpu())["main"]
    want = run_before(tvm.runtime.tensor(data)).numpy()
    got = run_after(*[tvm.runtime.tensor(v) for v in (data, *values)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_compiled_artifact_is_byte_identical_and_cached(tmp_path):
    for d in ("a", "b"):
        compile_model(onnx.load(str(EXAMPLE / "model.onnx")), "x86", tmp_path / d)
    for name in ("model.so", "params.bin", "artifact.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    args = [
        "optimize",
        str(EXAMPLE / "model.onnx"),
        "--passes",
        "fold-batchnorm",
        "--target",
        "x86",
        "--no-latency",
        "--cache-dir",
        str(tmp_path / "cache"),
        "-q",
    ]
    assert main([*args, "-o", str(tmp_path / "o1")]) == 0
    assert main([*args, "-o", str(tmp_path / "o2")]) == 0  # from the cache, compiled artifact included
    for name in ("model.so", "params.bin"):
        assert (tmp_path / "o1" / "compiled" / name).read_bytes() == (tmp_path / "o2" / "compiled" / name).read_bytes()
    import json

    assert json.loads((tmp_path / "o2" / "report.json").read_text())["cache"]["hit"] is True


@pytest.mark.parametrize(
    "pipeline",
    [
        "fold-batchnorm,prune-channels{ratio=0.5}",
        "fold-batchnorm,sparsify-blocks{sparsity=0.9,block=[16,1]}",
        "fold-batchnorm,quantize-binary",
    ],
)
@pytest.mark.slow
def test_arm_artifact_runs_under_qemu(pipeline, tmp_path):
    """The AArch64 library runs under qemu-user-static with an aarch64 Python and TVM runtime
    (the sysroot .ci/aarch64-sysroot.sh builds) and matches ONNX Runtime on x86: a pruned model
    on the dense schedules, a block-sparse one on the BSR conv kernels and a binarized one on the
    binary conv kernels (NEON). Timing under emulation means nothing; correctness does."""
    model, _ = apply(ARCHITECTURES["resnet"](), pipeline)
    x = sample_inputs(model, 2)["input"]
    art = compile_model(model, "arm", tmp_path / "arm", batch=2)
    if "sparsify" in pipeline:
        assert art.meta["rewrites"] == ["bsr-dense"]
        assert "kernel:bsr_conv2d" in art.meta["kernel_schedules"].values()
    if "binary" in pipeline:
        assert art.meta["rewrites"] == ["binary"]
        assert "kernel:binary_conv2d" in art.meta["kernel_schedules"].values()
    got = run_aarch64(tmp_path / "arm" / art.meta["library"], x, tmp_path)
    np.testing.assert_allclose(got, run(model, {"input": x})[0], rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(db) -> list[float]:
    import json

    return [json.loads(line)[1][1][0] for line in (db / "database_tuning_record.json").read_text().splitlines()]


@pytest.mark.slow
def test_tuning_writes_a_database_that_later_builds_reuse(tmp_path, capsys):
    model, _ = apply(ARCHITECTURES["mlp"](), "fold-batchnorm")
    onnx.save(model, str(tmp_path / "m.onnx"))
    args = [
        "compile",
        str(tmp_path / "m.onnx"),
        "--target",
        "x86",
        "--tune",
        "4",
        "--tuning-db",
        str(tmp_path / "db"),
        "--json",
    ]
    import json

    assert main([*args, "-o", str(tmp_path / "a1")]) == 0
    first = json.loads(capsys.readouterr().out)["tuning"]
    assert first["tasks"] >= 3 and first["tasks_tuned"] == first["tasks"] and first["tasks_from_database"] == 0
    # every task got a measured record: the default schedule's, plus the tuning trials
    assert first["default_schedules_recorded"] == first["tasks"]
    secs = _records(tmp_path / "db")
    assert len(secs) >= first["tasks"] and all(0 < s < 1 for s in secs)
    assert (tmp_path / "a1" / "tuning" / "database_tuning_record.json").exists()
    assert main([*args, "-o", str(tmp_path / "a2")]) == 0
    second = json.loads(capsys.readouterr().out)["tuning"]
    assert second["tasks_tuned"] == 0 and second["tasks_from_database"] == first["tasks"]
    assert json.loads((tmp_path / "a2" / "artifact.json").read_text())["schedules"] == {"database": first["tasks"]}
    feeds = sample_inputs(model, 1)
    for folder in ("a1", "a2"):
        got = load_artifact(tmp_path / folder)(feeds)[0]
        np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "arm", "--tune", "2"], "measures on the device"),
        (["--target", "cuda", "--tune", "2"], "CPU targets"),
        (["--target", "x86", "--tune", "-1"], "--tune must be"),
        (["--target", "x86", "--rpc-tracker", "localhost"], "go together"),
        (["--target", "x86", "--rpc-tracker", "localhost", "--rpc-key", "k"], "HOST:PORT"),
    ],
)
def test_bad_tuning_options_are_usage_errors(argv, message, tmp_path, capsys):
    assert main(["compile", str(EXAMPLE / "model.onnx"), *argv, "-o", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_contraction_rule_tiles_vectorizes_and_stays_exact():
    """The conv schedule itself, outside the pipeline: a parallel outer loop, a vectorized inner
    loop of the SIMD width, and the same numbers as numpy."""
    import tvm
    from graphslim.kernels.pipeline import NHWC_LAYOUTS
    from graphslim.kernels.schedules import ContractionCPU, vector_bits
    from models import ModelBuilder
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    from graphslim.backend.driver import _static_batch

    b = ModelBuilder("conv", (2, 16, 9, 9), 0)  # 560k multiply-adds: above the parallel threshold
    model = b.build(b.relu(b.conv("input", 24, k=3)))
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    with target:
        static = from_onnx(_static_batch(model, 2), keep_params_in_input=False)
        mod = relax.transform.ConvertLayout(NHWC_LAYOUTS)(static)
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
    name = next(gv for gv in mod.get_global_vars() if gv.name_hint.startswith("fused_conv2d"))
    sch = ContractionCPU().apply(mod[name], target, False)
    assert sch is not None and vector_bits(target) == 256
    text = sch.mod.script()
    assert "T.parallel(" in text and ("T.vectorized(T.int64(8))" in text or "T.vectorized(T.int64(24))" in text)
    assert "T.unroll(" in text
    if "avx2" not in __import__("graphslim.backend", fromlist=["x"]).host_cpu_flags():
        pytest.skip("host cannot run AVX2 code")
    lib = tvm.tirx.build(sch.mod["main"].with_attr("global_symbol", "main"), target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 24)).astype(np.float32)
    bias = rng.standard_normal((1, 1, 1, 24)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((2, 9, 9, 24), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(np.einsum("nhwc,cf->nhwf", xp[:, i : i + 9, j : j + 9], w[i, j]) for i in range(3) for j in range(3))
    np.testing.assert_allclose(out.numpy(), np.maximum(ref + bias, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec, bits",
    [
        ({"kind": "llvm", "mcpu": "haswell"}, 256),
        ({"kind": "llvm", "mcpu": "znver3"}, 256),
        ({"kind": "llvm", "mcpu": "skylake-avx512"}, 512),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 128),
    ],
)
def test_vector_width_comes_from_the_target_features(spec, bits):
    import tvm
    from graphslim.kernels.schedules import vector_bits

    assert vector_bits(tvm.target.Target(spec)) == bits


def test_small_kernels_stay_on_one_thread():
    """Below PARALLEL_MIN_MACS a kernel is not parallelized: waking the thread pool costs more."""
    import tvm
    from graphslim.kernels.pipeline import NHWC_LAYOUTS
    from graphslim.kernels.schedules import PARALLEL_MIN_MACS, ContractionCPU
    from models import ModelBuilder
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    from graphslim.backend.driver import _static_batch

    b = ModelBuilder("conv", (1, 4, 6, 6), 0)
    model = b.build(b.conv("input", 8, k=3))
    assert 36 * 8 * 36 < PARALLEL_MIN_MACS
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    with target:
        mod = relax.transform.ConvertLayout(NHWC_LAYOUTS)(
            from_onnx(_static_batch(model, 1), keep_params_in_input=False)
        )
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
    name = next(gv for gv in mod.get_global_vars() if gv.name_hint.startswith("fused_conv2d"))
    text = ContractionCPU().apply(mod[name], target, False).mod.script()
    assert "T.parallel(" not in text and "T.vectorized(" in text


def test_artifacts_needing_missing_instruction_sets_are_refused(monkeypatch):
    """An x86 artifact built for a CPU with AVX-512 / VNNI is refused on a CPU without them (by
    the features LLVM gives its target), and accepted where they exist."""
    import graphslim.backend.driver as backend

    monkeypatch.setattr(backend, "host_cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert backend._missing_cpu_features({"kind": "llvm", "mcpu": "cascadelake"}) == ["AVX512F", "AVX512-VNNI"]
    assert backend._missing_cpu_features({"kind": "llvm", "mcpu": "skylake-avx512"}) == ["AVX512F"]
    assert backend._missing_cpu_features({"kind": "llvm", "mcpu": "haswell"}) == []
    assert backend._missing_cpu_features({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}) == []
    monkeypatch.setattr(backend, "host_cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert backend._missing_cpu_features({"kind": "llvm", "mcpu": "cascadelake"}) == []


def test_rewrites_run_in_the_order_their_stages_list():
    from graphslim.kernels import FOLDED_REWRITES, IMPORT_REWRITES, REWRITES, import_stage

    order = [n for n, _ in IMPORT_REWRITES + FOLDED_REWRITES]
    assert list(REWRITES) == order and len(set(order)) == len(order)
    assert order.index("bsr-dense") < order.index("binary")  # a block-sparse binary weight goes to BSR
    assert order.index("int8-requantize") > order.index("int8-dense") and order[-1] == "packed-dense"
    assert [n for n in order if import_stage(n)] == ["int8-dense", "int8-conv", "int8-integer"]
    with pytest.raises(TypeError):
        REWRITES["mine"] = REWRITES["binary"]  # read-only: the order lives in the two tuples
