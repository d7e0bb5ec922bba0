"""graphslim search: the budget on held-out data, the recipe that reproduces the model byte for
byte, determinism, resuming a study, and worker processes sharing one SQLite study.

Small models and few trials: the bundled digits CNN (labels: top-1 accuracy) and the test MLP
(random weights and inputs, no labels: top-1 agreement with the original)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from graphslim.passes import DEFAULT_PIPELINE
from models import mlp_with_data

from graphslim.cli import main
from graphslim.core.data import Dataset
from graphslim.core.ir import Graph, load_model
from graphslim.core.ops import weight_matrix
from graphslim.pipeline import PassContext, PassManager, Pipeline
from graphslim.report import SCHEMA_PATH
from graphslim.run.options import Budgets, RunOptions, SearchOptions

optuna = pytest.importorskip("optuna")

from graphslim.run.search import (  # noqa: E402 - after the importorskip
    Knob,
    LatencyTable,
    Space,
    Timing,
    discover_knobs,
    estimate_latency,
    pareto_front,
    quantize_pass,
    search,
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "model.onnx"


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The bundled 497 digits images split in two: the first 250 calibrate, the rest are held out."""
    d = np.load(ROOT / "examples" / "digits" / "data.npz")
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "train.npz", input=d["input"][:250], labels=d["labels"][:250])
    np.savez(folder / "eval.npz", input=d["input"][250:], labels=d["labels"][250:])
    return folder / "train.npz", folder / "eval.npz"


def _opts(train: Path, evals: Path, **kw) -> SearchOptions:
    run = RunOptions(train_data=str(train), eval_data=str(evals), budgets=Budgets(max_accuracy_drop=1.0))
    base = {"objective": "bytes", "trials": 5, "sensitivity_samples": 120, "techniques": ("prune", "svd")}
    return SearchOptions(run=run, **{**base, **kw})


def _study(out: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out.parent / (out.name + '.search') / 'study.db'}"
    name = json.loads((out / "report.json").read_text())["search"]["study"]["name"]
    return optuna.load_study(study_name=name, storage=storage)


# --------------------------------------------------------------------------- the space


def _canonical(model: onnx.ModelProto) -> Graph:
    g = Graph.from_model(model)
    g.infer_shapes()
    PassManager(DEFAULT_PIPELINE).run(g, PassContext())
    return g


def test_knobs_follow_the_passes_that_apply():
    g = _canonical(load_model(DIGITS))
    knobs = {k.key: k for k in discover_knobs(g, ("prune", "heads", "svd", "int8", "sparse"))}
    # Channel groups by producer (conv2 and conv3 share one through the residual Add; fc2 reaches the output).
    assert {k for k in knobs if k.startswith("prune:")} == {"prune:conv1", "prune:conv2", "prune:fc1"}
    assert {k for k in knobs if k.startswith("int8:")} == {
        f"int8:{n}" for n in ("conv1", "conv2", "conv3", "fc1", "fc2")
    }
    assert not any(k.startswith(("heads:", "sparse:")) for k in knobs)  # no attention; sparse needs a target
    # SVD ranks only where they save at least 10% of the layer's parameters.
    for k in knobs.values():
        if k.kind == "svd":
            rows, cols = weight_matrix(g, next(n for n in g.nodes if n.name == k.name)).shape
            for r in k.choices[1:]:
                assert 1 - round(r * min(rows, cols)) * (rows + cols) / (rows * cols) >= 0.1
    assert all(len(k.choices) > 1 and k.choices[0] == 0.0 for k in knobs.values())
    sparse = {k.key for k in discover_knobs(g, ("sparse",), sparse=True)}
    assert sparse == {"sparse:conv1", "sparse:conv2", "sparse:conv3", "sparse:fc1"}  # >= 16 outputs


def test_a_choice_is_a_pipeline_that_parses_back():
    space = Space(
        (Knob("prune", "conv2", (0.0, 0.25)), Knob("svd", "fc1", (0.0, 0.5)), Knob("int8", "fc1", (0.0, 1.0))),
        DEFAULT_PIPELINE,
    )
    passes = space.structural({"prune:conv2": 0.25, "svd:fc1": 0.5, "int8:fc1": 1.0})
    text = ",".join(str(p) for p in passes)
    assert text == 'prune-channels{ratio=0.0,layer_ratios=["conv2=0.25"]},factorize-svd{layer_ranks=["fc1=0.5"]}'
    assert str(Pipeline.parse(text)) == text
    assert space.int8_layers({"int8:fc1": 1.0}) == {"fc1"}
    assert space.structural({}) == []
    # quantize-int8 gets every other weight layer in its exclude list, the factorized half kept with fc1.
    g = _canonical(load_model(DIGITS))
    recs = PassManager(passes).run(g, PassContext())
    q = quantize_pass(g, {"fc1"}, {r["name"] for r in recs[-1].stats["layers"]})
    first_half = g.producer(next(n for n in g.nodes if n.name == "fc1").inputs[0]).name
    assert set(q.options.exclude) == {"conv1", "conv2", "conv3", "fc2"} and first_half not in q.options.exclude
    assert q.options.sensitivity is False


def test_pareto_front():
    rows = [{"a": 1, "b": 5}, {"a": 2, "b": 2}, {"a": 3, "b": 3}, {"a": 2, "b": 2}, {"a": 0, "b": 9}]
    assert pareto_front(rows, ("a", "b")) == [rows[0], rows[1], rows[4]]


def test_latency_table_is_cached_by_layer_signature(tmp_path):
    model = _canonical(load_model(DIGITS)).to_model()
    sample = Dataset({"input": np.zeros((1, 1, 8, 8), np.float32)})
    table = LatencyTable(tmp_path / "t.json", Timing())
    times = table.layer_times(model, sample)
    assert set(times) == {"conv1", "conv2", "conv3", "fc1", "fc2"} and all(t >= 0 for t in times.values())
    first = table.timed
    assert first >= 6  # five layers and the empty model
    again = LatencyTable(tmp_path / "t.json", Timing())
    assert again.layer_times(model, sample) == times and again.timed == 0
    # A layer with another shape is a new entry; the others are reused.
    pruned = Graph.from_model(model)
    pruned.infer_shapes()
    PassManager('prune-channels{ratio=0.0,layer_ratios=["fc1=0.5"]}').run(pruned, PassContext())
    again.layer_times(pruned.to_model(), sample)
    assert again.timed == 2  # fc1 (fewer outputs) and fc2 (fewer inputs)


def test_latency_estimate_scales_the_original_by_its_layers():
    """The original maps to its measured latency, a model without layers to the empty call, and
    in between the estimate is linear in the layers' sum (so it ranks candidates as that sum
    does); a study whose baseline predates the empty-call cost keeps the additive estimate."""
    base = {"latency_ms": 3.0, "layers_ms": 1.5, "overhead_ms": 0.02}
    assert estimate_latency(base, 1.5) == 3.0
    assert estimate_latency(base, 0.0) == 0.02
    assert estimate_latency(base, 0.375) == pytest.approx(0.02 + 2.98 / 4)
    assert estimate_latency({**base, "layers_ms": 0.0}, 0.0) == 3.0
    old = {"latency_ms": 3.0, "layers_ms": 1.5}
    assert estimate_latency(old, 0.375) == pytest.approx(1.875)


# --------------------------------------------------------------------------- the command


def test_search_respects_the_budget_and_the_recipe_reproduces_the_model(tmp_path, digits_data, capsys):
    train, evals = digits_data
    out = tmp_path / "out"
    code = main(
        [
            "search",
            str(DIGITS),
            "--train-data",
            str(train),
            "--eval-data",
            str(evals),
            "--objective",
            "bytes",
            "--trials",
            "6",
            "--sensitivity-samples",
            "150",
            "--max-accuracy-drop",
            "1.0",
            "-o",
            str(out),
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    for f in ("model.onnx", "report.json", "report.md", "report.html", "recipe.json", "pareto.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    sec = rep["search"]
    assert sec["trials"] == 6 and sec["objective"] == "bytes" and sec["metric"]["name"] == "accuracy"
    # The budget holds on the held-out data, as the report (not the search) measured it.
    assert rep["data"]["eval_samples"] == 247 and rep["accuracy"]["samples"] == 247
    assert rep["accuracy"]["drop_points"] <= 1.0 and rep["budgets"]["max_accuracy_drop"]["met"]
    chosen = sec["chosen"]
    assert chosen["trial"] is not None and chosen["drop_points"] == rep["accuracy"]["drop_points"]
    assert rep["after"]["size_bytes"] == chosen["bytes"] < rep["before"]["size_bytes"] / 2
    assert chosen["sha256"] == rep["output"]["sha256"]  # the trial's model is the one written
    for row in sec["front"]:
        assert set(row) >= {"accuracy", "bytes", "macs", "latency_ms", "pipeline"}
        assert row["within_budget"] == (row["drop_points"] <= 1.0)
    assert "## Search" in (out / "report.md").read_text() and "Pareto front" in (out / "report.html").read_text()
    jsonschema.validate(rep, json.loads(SCHEMA_PATH.read_text()))
    # recipe.json + optimize --recipe: the same model, byte for byte.
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["pipeline"] == chosen["pipeline"] == rep["pipeline"]
    again = tmp_path / "again"
    args = ["optimize", str(DIGITS), "--recipe", str(out / "recipe.json"), "--train-data", str(train)]
    code = main([*args, "--eval-data", str(evals), "-o", str(again), "-q"])
    assert code == 0
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_int8_recipe_reproduces_with_its_calibration_data(tmp_path, digits_data):
    train, evals = digits_data
    out = tmp_path / "out"
    res = search(DIGITS, out, _opts(train, evals, techniques=("int8",), trials=3))
    pipeline = res.report["search"]["chosen"]["pipeline"]
    assert "quantize-int8{exclude=" in pipeline and "sensitivity=false" in pipeline  # 4x fewer weight bytes
    assert res.recipe["needs_training_data"]
    assert res.recipe["reproduce"].endswith(f"--train-data {train} --eval-data {evals} --seed 0")
    again = tmp_path / "again"
    # The command recipe.json records: the same data flags (they decide what int8 calibrates on).
    args = ["optimize", str(DIGITS), "--recipe", str(out / "recipe.json"), "--train-data", str(train)]
    assert main([*args, "--eval-data", str(evals), "-o", str(again), "-q"]) == 0
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_same_seed_same_trials_and_same_model_and_resume_continues_the_study(tmp_path, digits_data, capsys):
    train, evals = digits_data
    a = search(DIGITS, tmp_path / "a", _opts(train, evals, trials=4))
    b = search(DIGITS, tmp_path / "b", _opts(train, evals, trials=4))
    ta, tb = _study(tmp_path / "a").trials, _study(tmp_path / "b").trials
    assert len(ta) == 4 and [t.params for t in ta] == [t.params for t in tb]
    assert [t.values for t in ta] == [t.values for t in tb]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert a.report["search"]["chosen"]["pipeline"] == b.report["search"]["chosen"]["pipeline"]
    # Resuming (as after an interruption) continues the same study: the first trials stay as they
    # were, the sensitivity pass is not redone, the count goes on to --trials.
    before = [(t.number, t.params, t.values) for t in ta]
    c = search(DIGITS, tmp_path / "a", _opts(train, evals, trials=7, resume=True))
    trials = _study(tmp_path / "a").trials
    assert c.report["search"]["study"]["name"] == a.report["search"]["study"]["name"]
    assert [(t.number, t.params, t.values) for t in trials[:4]] == before
    assert len(trials) == 7 and c.report["search"]["trials"] == 7
    assert c.report["search"]["sensitivity"] == a.report["search"]["sensitivity"]
    # --resume without a study to continue, and a study made for other settings, are usage errors.
    args = ["search", str(DIGITS), "--train-data", str(train), "--eval-data", str(evals), "-o"]
    assert main([*args, str(tmp_path / "none"), "--resume"]) == 2
    assert "no study" in capsys.readouterr().err
    name = a.report["search"]["study"]["name"]
    assert main([*args, str(tmp_path / "a"), "--study", name, "--objective", "macs", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "objective" in err and len(err.splitlines()) == 1


def test_two_workers_split_one_sqlite_study(tmp_path, digits_data):
    train, evals = digits_data
    out = tmp_path / "out"
    res = search(DIGITS, out, _opts(train, evals, trials=8, workers=2, techniques=("prune",)))
    study = _study(out)
    states = optuna.trial.TrialState
    complete = [t for t in study.trials if t.state == states.COMPLETE]
    assert len(complete) == 8 and res.report["search"]["trials"] == 8
    assert sorted(t.number for t in complete) == list(range(8))  # no trial twice, none lost
    assert not [t for t in study.trials if t.state in (states.FAIL, states.RUNNING, states.WAITING)]
    assert all(len(t.values) == 2 and "pipeline" in t.user_attrs for t in complete)
    # Both workers ran trials (beside the seeds the first process ran before starting them).
    workers = {t.user_attrs["worker"] for t in complete if not t.user_attrs.get("seeded")}
    assert len(workers) == 2
    assert len(res.report["search"]["workers_seen"]) >= 2


def test_mlp_without_labels_is_judged_by_agreement_and_a_failing_candidate_fails_only_its_trial(tmp_path, monkeypatch):
    import graphslim.run.search as search_mod

    calls = {"n": 0}
    measure = search_mod._Evaluator.measure

    def flaky(self, cand, judge=None):
        if judge is None:  # the original's reference, then the trials
            calls["n"] += 1
            if calls["n"] == 2:
                raise Exception("ONNX Runtime cannot run this candidate")  # ORT's errors are plain Exceptions
        return measure(self, cand, judge)

    monkeypatch.setattr(search_mod._Evaluator, "measure", flaky)
    path, train, held = mlp_with_data(tmp_path, 128, 200)
    opts = _opts(train, held, objective="bytes", trials=4, techniques=("int8", "svd"))
    opts = replace(opts, run=RunOptions.build(opts.run, max_accuracy_drop=2.0))
    res = search(path, tmp_path / "out", opts)
    sec = res.report["search"]
    assert sec["metric"]["name"] == "agreement" and sec["metric"]["reference"] == 1.0
    assert res.report["budgets"]["max_accuracy_drop"]["met"]
    assert res.report["after"]["size_bytes"] < res.report["before"]["size_bytes"]
    assert sec["trials"] == 4 and sec["failed"] == 1


def test_missing_optuna_is_one_line_and_exit_2(monkeypatch, capsys, digits_data):
    monkeypatch.setitem(sys.modules, "optuna", None)
    train, evals = digits_data
    code = main(["search", str(DIGITS), "--train-data", str(train), "--eval-data", str(evals), "-o", "unused"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "graphslim[search]" in err


def test_bad_search_options_are_usage_errors(capsys, digits_data):
    train, evals = digits_data
    base = ["search", str(DIGITS), "--train-data", str(train), "-o", "unused"]
    assert main([*base, "--techniques", "prune,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main([*base, "--trials", "0"]) == 2
    capsys.readouterr()
    assert main([*base, "--clock", "cpu", "--threads", "2"]) == 2
    assert "--threads 1" in capsys.readouterr().err
    assert main(["search", str(DIGITS), "-o", "unused"]) == 2  # nothing held out to measure on
    assert "held-out" in capsys.readouterr().err


def test_every_search_option_is_in_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    common = {"--help", "--debug", "--quiet", "--verbose", "--json", "--output"}  # every command's, documented once
    flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - common
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### graphslim search") : readme.index("### The TVM backend")]
    usage = readme[readme.index("graphslim search MODEL") :]
    missing = sorted(f for f in flags if f not in section and f not in usage[:600])
    assert not missing, f"search options not documented in README: {missing}"
