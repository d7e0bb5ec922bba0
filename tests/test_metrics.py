"""graphslim.core.metrics: one metric per model output, used by every pass and the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import ARCHITECTURES, sample_inputs
from onnx import TensorProto, helper
from transformer_models import bert_like, pooled_cosine, sample_inputs_for

from graphslim.core.data import Dataset
from graphslim.core.errors import InputError
from graphslim.core.metrics import Evaluator, MetricSpec, choose_metric, input_array, score_outputs
from graphslim.core.runtime import run_model


def test_choice_follows_the_output_and_the_data():
    rng = np.random.default_rng(0)
    logits, hidden, emb = rng.standard_normal((8, 10)), rng.standard_normal((8, 5, 16)), rng.standard_normal((8, 16))
    labels = rng.integers(0, 10, 8)
    assert choose_metric([logits], labels=labels).name == "accuracy"
    assert choose_metric([logits]).name == "agreement"
    assert choose_metric([emb], output_names=["sentence_embedding"]).name == "cosine"
    assert choose_metric([hidden], input_names=["input_ids", "attention_mask"]).name == "pooled_cosine"
    assert choose_metric([hidden], input_names=["pixel_values"]).name == "cosine"
    lm = choose_metric([hidden], output_names=["logits"], input_names=["input_ids", "attention_mask"])
    assert lm.name == "agreement" and lm.mask_input == "attention_mask"
    # labels do not make hidden states a classifier; the second output is judged when asked
    assert choose_metric([hidden, logits], labels=labels, output=1).name == "accuracy"
    assert choose_metric([hidden], labels=labels, input_names=["attention_mask"]).name == "pooled_cosine"
    assert choose_metric([hidden], requested="mse").name == "mse"
    with pytest.raises(InputError, match="labels"):
        choose_metric([logits], requested="accuracy")
    with pytest.raises(InputError, match="attention-mask"):
        choose_metric([hidden], requested="pooled_cosine")
    with pytest.raises(InputError, match="unknown metric"):
        choose_metric([logits], requested="f1")


def test_pooled_cosine_ignores_padding_and_matches_the_reference_formula():
    model = bert_like()
    feeds = sample_inputs_for(model, 4, 12, seed=3)
    feeds["attention_mask"][:, 8:] = 0
    ref = run_model(model, Dataset(feeds))[0]
    new = ref + np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32) * 0.3
    spec = MetricSpec("pooled_cosine", 0, "last_hidden_state", "attention_mask")
    s = score_outputs(spec, [new], [ref], inputs=feeds)
    assert s.value == pytest.approx(pooled_cosine(ref, new, feeds["attention_mask"]), abs=1e-9)
    garbage = new.copy()
    garbage[:, 8:] = 1e6  # padded positions: whatever the model writes there does not count
    assert score_outputs(spec, [garbage], [ref], inputs=feeds).value == pytest.approx(s.value, abs=1e-9)
    unmasked = score_outputs(MetricSpec("cosine", 0), [garbage], [ref]).value
    assert unmasked < 0.5 * s.value


def test_evaluator_scores_models_and_drops_in_points():
    model = ARCHITECTURES["mlp"]()
    feeds = sample_inputs(model, 50, seed=2)
    ref = run_model(model, Dataset(feeds))[0]
    labels = np.argmax(ref, 1)
    labels[:5] = (labels[:5] + 1) % ref.shape[1]  # the model is right on 45 of 50
    ev = Evaluator(model, Dataset(feeds, labels))
    assert ev.spec.name == "accuracy" and ev.reference_value == pytest.approx(0.9)
    worse = ref.copy()
    worse[5:10] = -worse[5:10]  # 5 more wrong answers (argmax of -x differs here)
    assert np.all(np.argmax(worse[5:10], 1) != labels[5:10])
    assert ev.drop_points(ev.score_outputs([worse])) == pytest.approx(10.0)
    unlabeled = Evaluator(model, Dataset(feeds))
    assert unlabeled.spec.name == "agreement" and unlabeled.reference_value == 1.0
    assert unlabeled.drop_points(unlabeled.score_outputs([worse])) == pytest.approx(10.0)
    assert unlabeled.take(10).data.inputs["input"].shape[0] == 10


def test_mse_is_scale_free_and_higher_is_better():
    a = np.random.default_rng(1).standard_normal((6, 4, 8))
    spec = MetricSpec("mse", 0)
    for scale in (1e-3, 1.0, 1e3):
        s = score_outputs(spec, [(a + 0.1 * np.roll(a, 1, 0)) * scale], [a * scale])
        assert s.value == pytest.approx(1 - s.details["nmse"]) and s.details["nmse"] == pytest.approx(0.02, rel=0.5)
    assert score_outputs(spec, [a], [a]).value == 1.0


def test_fixed_batch_models_run_on_any_number_of_samples():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    data = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    out = run_model(model, Dataset({"x": data}))[0]
    np.testing.assert_allclose(out, np.maximum(data, 0))


def test_input_array_reads_sharded_data(tmp_path):
    from graphslim.core.data import load_data

    model = bert_like()
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", **sample_inputs_for(model, 4, 8, seed=i))
    data = load_data(tmp_path, model)
    mask = input_array(data, "attention_mask")
    assert mask.shape == (12, 8) and input_array(data, "nope") is None
    onnx.checker.check_model(model)
