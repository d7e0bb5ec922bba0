"""distill on onnxruntime-training (skipped where the training extra is not installed)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from conftest import apply, op_types
from models import run

from graphslim.core.data import load_npz
from graphslim.core.errors import GraphslimError, PassError
from graphslim.core.ir import load_model


def _has_training() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None and bool(
            __import__("onnxruntime.training.api")
        )
    except ImportError:
        return False


training = pytest.mark.skipif(not _has_training(), reason="needs the training extra (onnxruntime-training)")


@pytest.fixture(scope="module")
def digits(example_model_path=None):
    from conftest import EXAMPLE

    model = load_model(EXAMPLE / "model.onnx")
    return model, load_npz(EXAMPLE / "data.npz", model)


def _acc(model: onnx.ModelProto, data) -> float:
    return float(np.mean(np.argmax(run(model, data.inputs)[0], 1) == data.labels))


@training
def test_distill_recovers_pruned_student_and_lowers_kd_loss(digits):
    model, data = digits
    student, _ = apply(model, "fold-batchnorm,eliminate-identity,prune-channels{ratio=0.5}")
    out, recs = apply(
        model,
        "fold-batchnorm,eliminate-identity,prune-channels{ratio=0.5},distill{epochs=6}",
        data=data,
        teacher=model,
        seed=0,
    )
    st = recs[-1].stats
    hist = st["history"]
    best = next(h for h in hist if h["epoch"] == st["best_epoch"])
    assert best["eval_loss"] < hist[0]["eval_loss"]  # the KD objective went down
    assert st["after"] >= st["before"]  # never worse than the untrained student on the eval set
    assert st["after"] > st["before"] + 0.3  # and here much better: 50% pruning is recovered
    # Plain inference graph, same structure as the student, runs in ONNX Runtime.
    assert op_types(out) == op_types(student)
    onnx.checker.check_model(out, full_check=True)
    assert _acc(out, data) > _acc(student, data) + 0.3


@training
def test_distill_keeps_zero_blocks_zero_and_works_without_labels(digits):
    model, data = digits
    unlabeled = type(data)(data.inputs, None)
    sparse, _ = apply(model, "fold-batchnorm,eliminate-identity,sparsify-blocks{sparsity=0.7}")
    out, recs = apply(sparse, "distill{epochs=3,lr=0.003}", data=unlabeled, teacher=model)
    st = recs[0].stats
    assert st["metric"] == "agreement" and st["masked_tensors"] >= 4
    before = {i.name: onnx.numpy_helper.to_array(i) for i in sparse.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    changed = 0
    for name, w in before.items():
        if w.ndim >= 2:
            assert np.all(after[name][w == 0] == 0), name  # zeros stayed zero
            changed += int(not np.array_equal(after[name], w))
    assert recs[0].changed and changed > 0  # it trained (agreement went up) and kept the zeros


@training
def test_distill_refuses_quantized_model(digits):
    model, data = digits
    q, _ = apply(model, "fold-batchnorm,quantize-binary", data=data)
    out, recs = apply(q, "distill{epochs=1}", data=data, teacher=model)
    assert recs[0].changed is False
    assert "after distill" in recs[0].skipped[0].reason


@pytest.mark.skipif(_has_training(), reason="checks the message shown without the training extra")
def test_distill_without_training_extra_names_the_extra(digits):
    model, data = digits
    with pytest.raises(PassError) as e:
        apply(model, "fold-batchnorm,distill{epochs=1}", data=data, teacher=model)
    assert isinstance(e.value.cause, GraphslimError) and "graphslim[training]" in str(e.value)


@training
def test_distill_streams_sharded_training_data(digits, tmp_path):
    from conftest import EXAMPLE

    from graphslim.run import optimize

    model, data = digits
    for folder, (lo, hi) in (("train", (0, 400)), ("eval", (400, 497))):
        (tmp_path / folder).mkdir()
        for i, start in enumerate(range(lo, hi, 100)):
            part = data.slice(start, min(start + 100, hi))
            np.savez(tmp_path / folder / f"shard{i}.npz", input=part.inputs["input"], labels=part.labels)
    res = optimize(
        EXAMPLE / "model.onnx",
        None,
        pipeline="fold-batchnorm,eliminate-identity,prune-channels{ratio=0.5},distill{epochs=4}",
        train_data=tmp_path / "train",
        eval_data=tmp_path / "eval",
        measure_latency=False,
    )
    st = next(p for p in res.report["passes"] if p["name"] == "distill")["stats"]
    # distill validates on whole shards held out of the training data; the report's 97 eval
    # samples are seen by no pass.
    assert st["train_samples"] == 300 and st["eval_samples"] == 100
    assert res.report["data"] == {"train_samples": 400, "eval_samples": 97, "eval_source": "eval data"}
    assert st["after"] > st["before"] + 0.3


# --------------------------------------------------------------------------- transformers


def _sensitive_encoder() -> onnx.ModelProto:
    """A BERT-like encoder whose FFNs matter: HF's init (std 0.02) leaves a random model
    dominated by its residual path, where pruning costs nothing to recover; FFN weights x8 make
    pruning half the FFN drop the held-out pooled cosine to about 0.64."""
    from onnx import numpy_helper
    from transformer_models import bert_like

    model = bert_like(hidden=64, layers=2, ffn=256, vocab=512)
    for init in model.graph.initializer:
        if ".intermediate.dense.weight" in init.name or (
            ".output.dense.weight" in init.name and "attention" not in init.name
        ):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 8, init.name))
    return model


@pytest.fixture(scope="module")
def encoder_data():
    from test_quantize_transformer import token_data

    model = _sensitive_encoder()
    # Unlabelled: token ids and attention masks only. The held-out set is separate data.
    return model, token_data(model, 256, 32, seed=1), token_data(model, 96, 32, seed=2)


def _held_out(model: onnx.ModelProto, student: onnx.ModelProto, held) -> float:
    from graphslim.core.metrics import Evaluator

    return Evaluator(model, held).score(student).value


@training
@pytest.mark.parametrize("loss", ["cosine", "auto"])
def test_distill_hidden_states_raises_held_out_cosine(encoder_data, loss):
    model, data, held = encoder_data
    pruned, _ = apply(model, "prune-channels{ratio=0.5}")
    out, recs = apply(
        model, f"prune-channels{{ratio=0.5}},distill{{epochs=8,lr=0.003,loss={loss}}}", data=data, teacher=model
    )
    st = recs[-1].stats
    assert st["loss"] == ("cosine" if loss == "cosine" else "mse") and st["metric"] == "pooled_cosine"
    before, after = _held_out(model, pruned, held), _held_out(model, out, held)
    assert before < 0.8  # pruning half the FFN hurts this model
    assert after > before + 0.15 and after > 0.95  # distillation recovers most of it, on unseen data
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in pruned.graph.node]


@training
def test_distill_matches_intermediate_layers_through_a_learned_projection(encoder_data):
    model, data, held = encoder_data
    gelu, ln = (
        "/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1",
        "/encoder/layer.0/output/LayerNorm/LayerNormalization",
    )
    pipe = f'prune-channels{{ratio=0.5}},distill{{epochs=6,lr=0.003,layers=["{gelu}","{ln}"]}}'
    out, recs = apply(model, pipe, data=data, teacher=model)
    layers = {lay["student"]: lay for lay in recs[-1].stats["layers"]}
    g, n = layers[gelu + "_output_0"], layers[ln + "_output_0"]
    assert (g["width_student"], g["width_teacher"], g["projection"]) == (128, 256, "learned (least-squares init)")
    assert (n["width_student"], n["projection"]) == (64, "identity")
    assert _held_out(model, out, held) > 0.95
    # the projections trained with the student but are not part of the result
    assert not any(i.name.startswith("graphslim_projection") for i in out.graph.initializer)
    assert len(out.graph.output) == 1


@training
def test_distill_that_cannot_run_says_why(encoder_data, tmp_path, capsys):
    from graphslim.cli import main
    from graphslim.core.ir import save_model

    model, data, _ = encoder_data
    _, recs = apply(model, "distill{loss=kl,epochs=1}", data=data, teacher=model)
    assert recs[0].changed is False and "loss=kl needs (N, classes) logits" in recs[0].not_run
    save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **data.inputs)
    code = main(
        [
            "optimize",
            str(tmp_path / "m.onnx"),
            "--data",
            str(tmp_path / "d.npz"),
            "--passes",
            "distill{loss=kl,epochs=1}",
            "-o",
            str(tmp_path / "out"),
            "--no-latency",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4 and "did not run: loss=kl needs" in err and "no change ()" not in err
    import json

    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["not_run"][0]["reason"].startswith("loss=kl needs")


@training
def test_spiral_on_a_transformer(encoder_data):
    model, data, held = encoder_data
    pipe = 'spiral{steps=3,passes="prune-channels{ratio=0.25}",distill="distill{epochs=4,lr=0.003}",target_params=0.75,max_drop=5.0}'
    out, recs = apply(model, pipe, data=data, teacher=model)
    st = recs[0].stats
    assert st["metric"] == "pooled_cosine" and recs[0].changed
    kept = [p for p in st["curve"] if not p.get("rolled_back")][-1]
    assert kept["r_params"] < 0.95 and kept["drop_points"] <= 5.0
    assert _held_out(model, out, held) > 0.93
