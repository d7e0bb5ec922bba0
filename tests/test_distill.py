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
