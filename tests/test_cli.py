"""The command line as a user (or a build system) runs it: exit codes, files, JSON, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs

from graphslim.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphslim.cli", *args], capture_output=True, text=True, timeout=300)


def test_optimize_example_writes_model_and_report(tmp_path, example_model, example_data, capsys):
    before = example_model.read_bytes()
    out = tmp_path / "out"
    assert (
        main(["optimize", str(example_model), "-o", str(out), "--data", str(example_data), "--verify", "--json"]) == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".graphslim.json",  # the marker: graphslim wrote this folder (and may replace it)
        "accuracy.png",
        "latency.png",
        "layers.png",
        "model.onnx",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert json.loads((out / "report.json").read_text())["pipeline"] == rep["pipeline"]
    assert example_model.read_bytes() == before  # input untouched
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in model.graph.node]
    assert rep["accuracy"]["before"] > 0.9 and rep["accuracy"]["drop_points"] == 0
    assert rep["before"]["params"] > rep["after"]["params"]
    assert rep["compression"]["r_params"] == pytest.approx(rep["after"]["params"] / rep["before"]["params"], rel=1e-5)
    assert all(p["verification"]["checker"] == "ok" for p in rep["passes"])
    x = np.load(example_data)["input"][:8]
    assert_same_outputs(onnx.load(str(example_model)), model, feeds={"input": x})


def test_same_input_gives_same_bytes(tmp_path, example_model):
    for d in ("a", "b"):
        assert main(["optimize", str(example_model), "-o", str(tmp_path / d), "--no-latency", "-q"]) == 0
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", None])
def test_bad_model_exits_2_without_traceback(tmp_path, content, example_model):
    p = tmp_path / "bad.onnx"
    if content is None:
        p.write_bytes(example_model.read_bytes()[:5000])  # truncated
    else:
        p.write_bytes(content)
    r = _run("optimize", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("graphslim: error:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".out")]


def test_bad_pipeline_and_bad_data_exit_2(tmp_path, example_model):
    r = _run("optimize", str(example_model), "-o", str(tmp_path / "o"), "--passes", "prune-everything")
    assert r.returncode == 2 and "unknown pass 'prune-everything'" in r.stderr
    bad = tmp_path / "d.npz"
    np.savez(bad, wrong_name=np.zeros((2, 1, 8, 8), np.float32))
    r = _run("optimize", str(example_model), "-o", str(tmp_path / "o"), "--data", str(bad))
    assert r.returncode == 2 and "no array for model input" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_output_folder_containing_input_is_refused(tmp_path, example_model):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.onnx").write_bytes(example_model.read_bytes())
    r = _run("optimize", str(d / "model.onnx"), "-o", str(d))
    assert r.returncode == 2 and "contains the input" in r.stderr
    assert (d / "model.onnx").read_bytes() == example_model.read_bytes()


def test_existing_output_is_replaced_whole(tmp_path, example_model):
    out = tmp_path / "out"
    assert main(["optimize", str(example_model), "-o", str(out), "--no-latency", "-q"]) == 0
    (out / "report.md").write_text("stale")  # a file graphslim wrote, edited: replaced with the rest
    assert (
        main(["optimize", str(example_model), "-o", str(out), "--no-latency", "-q", "--passes", "fold-batchnorm"]) == 0
    )
    assert json.loads((out / "report.json").read_text())["pipeline"] == "fold-batchnorm"
    assert (out / "report.md").read_text() != "stale"
    (out / "stale.txt").write_text("old")  # a file graphslim did not write: only --force replaces it
    assert main(["optimize", str(example_model), "-o", str(out), "--no-latency", "-q"]) == 2
    assert main(["optimize", str(example_model), "-o", str(out), "--no-latency", "-q", "--force"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and {"model.onnx", "report.json", "report.md", "report.html"} <= names


def test_inspect_json_keys(example_model, capsys):
    assert main(["inspect", str(example_model), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("params", "macs", "size_bytes", "sparsity", "nodes", "layers"):
        assert key in rep
    conv2 = next(lay for lay in rep["layers"] if lay["name"] == "conv2")
    assert conv2["params"] == 32 * 16 * 9 and conv2["macs"] == 32 * 16 * 9 * 64  # 8x8 output
    fc1 = next(lay for lay in rep["layers"] if lay["name"] == "fc1")
    assert fc1["params"] == 512 * 64 + 64 and fc1["macs"] == 512 * 64
    assert rep["params"] == sum(lay["params"] for lay in rep["layers"])
    assert rep["size_bytes"] > 4 * rep["params"]


def test_passes_lists_registry(capsys):
    assert main(["passes", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)["passes"]}
    assert {
        "fold-constants",
        "fold-batchnorm",
        "eliminate-identity",
        "eliminate-dead-nodes",
        "fuse-matmul-add",
    } <= names


def test_print_pipeline_and_version(example_model):
    r = _run("optimize", str(example_model), "-o", "x", "--passes", "fold-constants{max_mib=16}", "--print-pipeline")
    assert r.returncode == 0 and r.stdout.strip() == "fold-constants"
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("graphslim ")


def test_cli_targets_are_the_backends():
    """The CLI keeps its own copy of the target names (it imports no ONNX or TVM at start-up);
    the two lists must not drift apart."""
    from graphslim.backend import TARGETS
    from graphslim.cli.main import TARGET_CHOICES

    assert TARGET_CHOICES == TARGETS
