"""spiral (with and without distill), graphslim eval, budgets and data sources."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLE, apply, assert_same_outputs
from test_distill import training

from graphslim.cli import main
from graphslim.core.data import Dataset, load_data, load_npz
from graphslim.core.errors import InputError
from graphslim.core.ir import load_model


@pytest.fixture(scope="module")
def digits():
    model = load_model(EXAMPLE / "model.onnx")
    return model, load_npz(EXAMPLE / "data.npz", model)


def test_spiral_without_distill_rolls_back_past_the_budget(digits):
    model, data = digits
    out, recs = apply(
        model,
        'fold-batchnorm,spiral{steps=4,passes="prune-channels{ratio=0.3}",distill="",target_params=0.05,max_drop=5.0}',
        data=data,
        teacher=model,
    )
    st = recs[-1].stats
    curve = st["curve"]
    # Pruning 30% of the channels without distillation costs far more than 5 points here (22.2
    # measured): step 1 is rolled back and the spiral stops there, with the step-0 model.
    assert [p["step"] for p in curve] == [0, 1]
    assert "rolled_back" not in curve[0] and curve[0]["drop_points"] == 0.0
    assert curve[1]["rolled_back"] is True and curve[1]["drop_points"] > 15.0
    assert curve[1]["r_params"] < 0.6 * curve[0]["r_params"]  # the step did prune (0.512 of 0.995)
    assert st["stopped"] == f"step 1 lost {curve[1]['drop_points']:.2f} points, more than max_drop=5.0"
    assert st["final_r_params"] == curve[0]["r_params"] and st["final_drop_points"] == 0.0
    assert st["target_reached"] is False
    assert any(s.where == "step 1" and s.reason.startswith("rolled back") for s in recs[-1].skipped)
    assert recs[-1].changed is False  # rolled back to where it started: no change (the version moved)
    # The result is the model before the rolled-back step: fold-batchnorm's output, unchanged.
    folded, _ = apply(model, "fold-batchnorm")
    assert [i.dims for i in out.graph.initializer] == [i.dims for i in folded.graph.initializer]
    assert_same_outputs(folded, out, rtol=0, atol=0, feeds={"input": data.inputs["input"][:64]})


@training
def test_spiral_with_distill_reaches_a_quarter_within_budget(digits):
    model, data = digits
    out, recs = apply(
        model,
        'fold-batchnorm,eliminate-identity,spiral{steps=5,passes="prune-channels{ratio=0.3}",'
        'distill="distill{epochs=8}",target_params=0.3,max_drop=3.0}',
        data=data,
        teacher=model,
    )
    st = recs[-1].stats
    assert st["final_drop_points"] <= 3.0
    assert st["final_r_params"] < 0.6


def test_eval_command_accuracy_and_fidelity(tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                str(EXAMPLE / "model.onnx"),
                "--data",
                str(EXAMPLE / "data.npz"),
                "--reference",
                str(EXAMPLE / "model.onnx"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] > 0.95 and out["fidelity"]["top1_agreement"] == 1.0 and out["fidelity"]["max_abs_diff"] == 0
    d = np.load(EXAMPLE / "data.npz")
    np.savez(tmp_path / "nolabels.npz", input=d["input"][:20])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphslim.cli",
            "eval",
            str(EXAMPLE / "model.onnx"),
            "--data",
            str(tmp_path / "nolabels.npz"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--reference" in r.stderr


def test_budgets_exit_3_and_keep_outputs(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(
        [
            "optimize",
            str(EXAMPLE / "model.onnx"),
            "-o",
            str(out),
            "--data",
            str(EXAMPLE / "data.npz"),
            "--passes",
            "fold-batchnorm,prune-channels{ratio=0.7}",
            "--max-accuracy-drop",
            "1",
            "--min-compression",
            "0.5",
            "--no-latency",
            "--json",
        ]
    )
    assert code == 3
    rep = json.loads(capsys.readouterr().out)
    assert rep["budgets"]["max_accuracy_drop"]["met"] is False
    assert rep["budgets"]["min_compression"]["met"] is True
    assert (out / "model.onnx").exists() and (out / "report.json").exists()
    code = main(
        [
            "optimize",
            str(EXAMPLE / "model.onnx"),
            "-o",
            str(tmp_path / "p"),
            "--data",
            str(EXAMPLE / "data.npz"),
            "--max-accuracy-drop",
            "0.5",
            "--min-compression",
            "1.0",
            "--max-latency-ms",
            "1000",
            "-q",
        ]
    )
    assert code == 0


def test_data_from_shards_and_entry_point(tmp_path, digits, monkeypatch):
    model, data = digits
    (tmp_path / "shards").mkdir()
    for i in range(3):
        part = data.slice(i * 100, (i + 1) * 100)
        np.savez(tmp_path / "shards" / f"part{i}.npz", input=part.inputs["input"], labels=part.labels)
    sharded = load_data(tmp_path / "shards", model)
    assert len(sharded) == 300 and np.array_equal(sharded.labels, data.labels[:300])
    # Streams: batches cover every sample once, shuffled by the seed, with their global indices.
    seen = np.concatenate([idx for idx, _ in sharded.index_batches(64, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == list(range(300)) and seen.tolist() != list(range(300))
    for idx, batch in sharded.index_batches(50, shuffle=True, seed=3):
        np.testing.assert_array_equal(batch.inputs["input"], data.inputs["input"][idx])
    assert np.array_equal(sharded.take(150).labels, data.labels[:150])
    train, ev = sharded.split(0.34, seed=0)
    assert (len(train), len(ev)) == (200, 100)  # whole shards held out
    (tmp_path / "shards" / "part9.npz").write_bytes(b"broken")
    with pytest.raises(InputError, match="part9.npz"):
        load_data(tmp_path / "shards", model)
    (tmp_path / "shards" / "part9.npz").unlink()
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        f"def batches():\n    d = np.load({str(EXAMPLE / 'data.npz')!r})\n"
        "    for i in range(0, 64, 16):\n        yield {'input': d['input'][i:i+16], 'labels': d['labels'][i:i+16]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = load_data("mydata:batches", model)
    assert len(ep) == 64 and np.array_equal(ep.labels, data.labels[:64])
    with pytest.raises(InputError, match="cannot load the data function"):
        load_data("nosuchmodule:fn", model)


def test_optimize_with_sharded_data(tmp_path, digits):
    from graphslim.run import optimize

    model, data = digits
    (tmp_path / "shards").mkdir()
    for i in range(4):
        part = data.slice(i * 120, (i + 1) * 120)
        np.savez(tmp_path / "shards" / f"part{i}.npz", input=part.inputs["input"], labels=part.labels)
    res = optimize(
        EXAMPLE / "model.onnx",
        None,
        pipeline="fold-batchnorm,quantize-int8{max_drop=5}",
        data=tmp_path / "shards",
        measure_latency=False,
    )
    # One whole shard is held out for the report before any pass runs; calibration streams the rest.
    assert res.report["data"]["train_samples"] == 360 and res.report["data"]["eval_samples"] == 120
    assert res.report["accuracy"]["samples"] == 120 and res.report["accuracy"]["drop_points"] <= 5


def test_train_eval_split_is_seeded(digits):
    from graphslim.pipeline import PassContext

    _, data = digits
    a = PassContext(data=data, seed=1).train_eval_split(0.2)
    b = PassContext(data=data, seed=1).train_eval_split(0.2)
    assert np.array_equal(a[1].labels, b[1].labels) and len(a[1]) == round(0.2 * len(data))
    explicit = PassContext(data=data, eval_data=Dataset(data.inputs, data.labels)).train_eval_split()
    assert len(explicit[0]) == len(explicit[1]) == len(data)
