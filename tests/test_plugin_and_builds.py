"""Build-system integration: the example plugin (entry points), the CMake example, the cache,
the stable Python API, and SIGTERM during optimize."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE, ROOT, assert_same_outputs

import graphslim


def _pip_install_target(src, target) -> None:
    # With build isolation: a fresh venv's own setuptools may be too old to build a wheel.
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _tree(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_example_plugin_installs_and_runs_in_a_pipeline(tmp_path):
    # pip builds in the source folder (build/, *.egg-info): build a copy, leave the checkout alone.
    example = ROOT / "examples" / "plugin"
    before = _tree(example)
    src = tmp_path / "plugin"
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    _pip_install_target(src, site)
    assert _tree(example) == before
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "graphslim.cli", *a],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    r = run("passes", "--json")
    assert r.returncode == 0, r.stderr
    assert "round-weights" in {p["name"] for p in json.loads(r.stdout)["passes"]}
    out = tmp_path / "out"
    r = run(
        "optimize",
        str(EXAMPLE / "model.onnx"),
        "-o",
        str(out),
        "--passes",
        "fold-batchnorm,round-weights{decimals=2}",
        "--no-latency",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passes"][1]["stats"]["layers_rounded"] == 5
    weights = [
        onnx.numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer if len(i.dims) >= 2
    ]
    assert all(np.allclose(w, np.round(w, 2), atol=1e-6) for w in weights)
    # Without the plugin on the path the pass is unknown: exit 2 with the valid names.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphslim.cli",
            "optimize",
            str(EXAMPLE / "model.onnx"),
            "-o",
            str(tmp_path / "x"),
            "--passes",
            "round-weights",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "unknown pass 'round-weights'" in r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_example_rebuilds_only_when_inputs_change(tmp_path):
    src, build = ROOT / "examples" / "cmake", tmp_path / "build"
    graphslim_exe = shutil.which("graphslim") or f"{sys.executable} -m graphslim.cli"
    cfg = subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            f"-DGRAPHSLIM_EXECUTABLE={graphslim_exe}",
            f"-DEXAMPLE_MODEL={EXAMPLE / 'model.onnx'}",
            f"-DEXAMPLE_DATA={EXAMPLE / 'data.npz'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr

    def build_once() -> str:
        r = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    first = build_once()
    model = build / "digits_slim" / "model.onnx"
    assert model.exists() and "graphslim optimize" in first
    stamp = model.stat().st_mtime_ns
    second = build_once()
    assert "graphslim optimize" not in second and model.stat().st_mtime_ns == stamp  # up to date: no work
    recipe = build / "digits.recipe.json"
    time.sleep(1.1)
    recipe.write_text(
        json.dumps({"passes": ["fold-batchnorm", {"name": "prune-channels", "options": {"ratio": 0.25}}]})
    )
    third = build_once()
    assert "graphslim optimize" in third and model.stat().st_mtime_ns != stamp


def test_cache_dir_reuses_outputs(tmp_path):
    cache = tmp_path / "cache"
    a = graphslim.optimize(
        EXAMPLE / "model.onnx",
        tmp_path / "a",
        pipeline="fold-batchnorm,prune-channels{ratio=0.3}",
        data=EXAMPLE / "data.npz",
        cache_dir=cache,
        measure_latency=False,
    )
    b = graphslim.optimize(
        EXAMPLE / "model.onnx",
        tmp_path / "b",
        pipeline="fold-batchnorm,prune-channels{ratio=0.3}",
        data=EXAMPLE / "data.npz",
        cache_dir=cache,
        measure_latency=False,
    )
    assert a.report["cache"] == {"key": a.report["cache"]["key"], "hit": False}
    assert b.report["cache"] == {"key": a.report["cache"]["key"], "hit": True}
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    c = graphslim.optimize(
        EXAMPLE / "model.onnx",
        None,
        pipeline="fold-batchnorm,prune-channels{ratio=0.3}",
        data=EXAMPLE / "data.npz",
        cache_dir=cache,
        seed=1,
        measure_latency=False,
    )
    assert c.report["cache"]["key"] != a.report["cache"]["key"] and c.report["cache"]["hit"] is False


@pytest.mark.parametrize("name", graphslim.__all__)
def test_public_api_is_listed_and_documented(name):
    obj = getattr(graphslim, name)
    if name == "__version__":
        assert isinstance(obj, str) and obj
        return
    # A class's own docstring (not inherited), and not the signature @dataclass writes when
    # there is none.
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    assert doc and doc.strip() and not doc.startswith(f"{obj.__name__}("), name


def test_public_api_runs_a_pipeline(tmp_path):
    for name in ("optimize", "PassManager", "load", "save", "Pipeline", "register_pass", "Graph", "PassContext"):
        assert name in graphslim.__all__
    model = graphslim.load(EXAMPLE / "model.onnx")
    g = graphslim.Graph.from_model(model)
    g.infer_shapes()
    records = graphslim.PassManager("fold-batchnorm").run(g, graphslim.PassContext())
    assert records[0].changed and records[0].name == "fold-batchnorm"
    graphslim.save(g.to_model(), tmp_path / "folded.onnx")
    folded = graphslim.load(tmp_path / "folded.onnx")
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" in [n.op_type for n in model.graph.node] and "BatchNormalization" not in ops
    x = {"input": np.load(EXAMPLE / "data.npz")["input"][:32]}
    assert_same_outputs(model, folded, rtol=1e-4, atol=1e-5, feeds=x)


def test_sigterm_leaves_previous_output_intact_or_complete(tmp_path):
    out = tmp_path / "out"
    graphslim.optimize(EXAMPLE / "model.onnx", out, pipeline="fold-batchnorm", measure_latency=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "graphslim.cli",
                "optimize",
                str(EXAMPLE / "model.onnx"),
                "-o",
                str(out),
                "--data",
                str(EXAMPLE / "data.npz"),
                "--passes",
                "fold-batchnorm,prune-channels{ratio=0.5},quantize-int8",
                "-q",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        names = {p.name for p in out.iterdir()}
        model = onnx.load(str(out / "model.onnx"))
        report = json.loads((out / "report.json").read_text())
        assert report["output"]["sha256"]  # a complete report
        if "QuantizeLinear" in [n.op_type for n in model.graph.node]:
            assert "quantize-int8" in report["pipeline"]  # the new run, whole
        else:
            assert {n: (out / n).read_bytes() for n in names} == before  # the old run, untouched
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left
