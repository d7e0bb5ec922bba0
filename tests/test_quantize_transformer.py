"""quantize-int8 / quantize-binary on transformers and the int8 rules per op (see
graphslim/transforms/quantization.py): sizes against ONNX Runtime's quantize_dynamic, the
model's own metric, calibration that reaches the quantizer, fixed batch sizes."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import apply
from onnx import TensorProto, helper, numpy_helper
from transformer_models import bert_like, token_feeds

from graphslim.core.data import Dataset
from graphslim.core.ir import model_bytes
from graphslim.core.metrics import Evaluator
from graphslim.transforms.quantization import PER_CHANNEL_GAIN, entropy_range, per_channel_gain


def token_data(model: onnx.ModelProto, n: int, seq: int, seed: int) -> Dataset:
    """Unlabelled text-like data (:func:`transformer_models.token_feeds`)."""
    return Dataset(token_feeds(model, n, seq, seed))


def with_pooler(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Add Hugging Face BertModel's pooler (tanh(dense(CLS))) as a second output [B, H], as in
    the issue's encoder: an (N, H) output the old sensitivity read as classifier logits."""
    h = model.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(seed)
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "pool_idx"),
            numpy_helper.from_array(np.array([1], np.int64), "pool_axes"),
            numpy_helper.from_array((rng.standard_normal((h, h)) * 0.02).astype(np.float32), "pooler.dense.weight"),
            numpy_helper.from_array((rng.standard_normal(h) * 0.02).astype(np.float32), "pooler.dense.bias"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Gather", ["last_hidden_state", "pool_idx"], ["cls3"], axis=1, name="/pooler/Gather"),
            helper.make_node("Squeeze", ["cls3", "pool_axes"], ["cls"], name="/pooler/Squeeze"),
            helper.make_node(
                "Gemm", ["cls", "pooler.dense.weight", "pooler.dense.bias"], ["pooled"], transB=1, name="/pooler/Gemm"
            ),
            helper.make_node("Tanh", ["pooled"], ["pooler_output"], name="/pooler/Tanh"),
        ]
    )
    g.output.append(helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["B", h]))
    return model


def _ort_quantize_dynamic(model: onnx.ModelProto, tmp_path) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    src.write_bytes(model_bytes(model))
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(prev)
    return dst.read_bytes()


@pytest.fixture(scope="module")
def encoder() -> onnx.ModelProto:
    return bert_like(hidden=128, heads=4, layers=2, ffn=512, vocab=2000, max_positions=64)


def test_dynamic_int8_is_no_larger_than_ort_and_keeps_the_embedding_cosine(encoder, tmp_path):
    out, recs = apply(encoder, "quantize-int8{mode=dynamic}")
    ours, ort = len(model_bytes(out)), len(_ort_quantize_dynamic(encoder, tmp_path))
    assert ours <= 1.02 * ort, (ours, ort)
    assert ours < 0.3 * len(model_bytes(encoder))
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    int8 = {k: v for k, v in inits.items() if v.dtype == np.int8}
    # every MatMul weight and the embedding tables are signed int8, none uint8
    assert len(int8) == 2 * 6 + 3 and not any(v.dtype == np.uint8 for v in inits.values())
    assert max(v.size for v in int8.values()) == 2000 * 128  # the word embeddings
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulInteger") == 12 and ops.count("DynamicQuantizeLinear") == 8  # Q, K, V share one
    held = token_data(encoder, 64, 32, seed=7)
    ev = Evaluator(encoder, held)
    assert ev.spec.name == "pooled_cosine"
    assert ev.score(out).value >= 0.99
    layers = recs[0].stats["layers"]
    assert {lay["activations"] for lay in layers if lay["op"] == "MatMul"} == {"uint8, dynamic per tensor"}
    assert {lay["activations"] for lay in layers if lay["op"] == "Gather"} == {"float (weight-only int8)"}


def test_op_types_do_not_change_each_others_form(encoder):
    with_conv, _ = apply(encoder, "quantize-int8{mode=dynamic,op_types=[Conv,MatMul]}")
    without, _ = apply(encoder, "quantize-int8{mode=dynamic,op_types=[MatMul]}")
    for m in (with_conv, without):
        w = [numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("_int8")]
        assert len(w) == 12 and all(a.dtype == np.int8 for a in w)
    # Gather not listed: the tables stay float, and the report says why
    _, recs = apply(encoder, "quantize-int8{mode=dynamic,op_types=[MatMul]}")
    assert any("Gather is not in op_types" in s.reason for s in recs[0].skipped)


def test_static_with_the_models_metric_keeps_fewer_layers_in_float():
    """Before the metric module this model (bert_like + pooler, 128 unlabelled samples) kept 8 of
    its 13 layers in float: sensitivity read the pooler output's argmax as class agreement."""
    model = with_pooler(bert_like(hidden=64, layers=2, ffn=128, vocab=512))
    data = token_data(model, 128, 32, seed=1)
    out, recs = apply(model, "quantize-int8", data=data, verify=True)
    st = recs[0].stats
    assert st["metric"] == "pooled_cosine" and st["sensitivity_samples"] <= 32
    assert len(st["kept_float"]) < 8 and len(st["kept_float"]) <= 1
    assert st["final_drop_points"] <= 0.5
    assert recs[0].verification["cosine"] > 0.99


def test_static_on_gemm_only_leaves_the_attention_softmax_alone():
    """With op_types=[Gemm] calibration does not cover the attention Softmax outputs, which ONNX
    Runtime's quantizer sets to [0, 1] for every Softmax in the model (it failed on them)."""
    model = with_pooler(bert_like(hidden=64, layers=2, ffn=128, vocab=512))
    data = token_data(model, 32, 16, seed=2)
    out, recs = apply(model, "quantize-int8{op_types=[Gemm],sensitivity=false}", data=data, verify=True)
    assert recs[0].stats["quantized"] == 1  # the pooler's Gemm; the projections are MatMuls
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("Softmax") == 2
    assert recs[0].verification["cosine"] > 0.999


def test_calibration_method_reaches_the_quantizer():
    model = bert_like(hidden=64, layers=1, ffn=128, vocab=512)
    data = token_data(model, 64, 32, seed=2)
    scales = {}
    for method in ("minmax", "entropy", "percentile{percentile=99.0}", "percentile{percentile=99.9999}"):
        name, _, extra = method.partition("{")
        opts = f"calibration={name},sensitivity=false" + ("," + extra.rstrip("}") if extra else "")
        out, recs = apply(model, f"quantize-int8{{{opts}}}", data=data)
        assert recs[0].stats["calibration"] == name
        inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
        scales[method] = np.array([v for k, v in sorted(inits.items()) if k.endswith("_scale") and v.ndim == 0])
    assert len({s.size for s in scales.values()}) == 1
    mm = scales["minmax"]
    # clipping methods give smaller activation ranges than minmax, and the percentile option matters
    assert np.all(scales["entropy"] <= mm + 1e-9) and np.any(scales["entropy"] < 0.9 * mm)
    assert np.any(scales["percentile{percentile=99.0}"] < 0.9 * scales["percentile{percentile=99.9999}"])


def test_entropy_range_clips_long_tails():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100000), [40.0, -40.0]])
    t = np.abs(x).max()
    hist, edges = np.histogram(x, 2048, range=(-t, t))
    lo, hi = entropy_range(hist, edges, x.min(), x.max())
    assert 2.0 < hi < 10.0 and -10.0 < lo < -2.0  # the two outliers do not set the range


def test_static_calibrates_a_fixed_batch_model():
    """An MNIST-style CNN with input 1x1x28x28 and 64 calibration samples (was: "Got: 64 Expected: 1")."""
    from models import ModelBuilder

    b = ModelBuilder("fixed", (1, 1, 28, 28))
    x = b.relu(b.conv("input", 8))
    model = b.build(b.gemm(b.flatten(b.gap(x)), 10))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch of one, as exported
    feeds = {"input": np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)}
    out, recs = apply(model, "quantize-int8", data=Dataset(feeds), verify=True)
    st = recs[0].stats
    assert st["calibration_samples"] == 64 and st["quantized"] >= 2
    assert "QuantizeLinear" in [n.op_type for n in out.graph.node]


def _outlier_token_model() -> tuple[onnx.ModelProto, Dataset]:
    """LayerNorm(x @ W) on x [B, S, 32] where one token is 100x larger than the rest (the
    outlier-token pattern of real transformers): one scale per tensor leaves the normal tokens
    a handful of levels, and the LayerNorm makes every token count in the output."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], axis=-1, name="ln"),
        ],
        "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, 16])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = rng.standard_normal((64, 8, 32)).astype(np.float32)
    x[:, 0] *= 100.0
    return model, Dataset({"x": x})


def test_per_token_activations_where_they_help():
    model, data = _outlier_token_model()
    held = Evaluator(model, data)
    tensor, _ = apply(model, "quantize-int8{mode=dynamic,activations=per_tensor}")
    token, _ = apply(model, "quantize-int8{mode=dynamic,activations=per_token}")
    e_tensor, e_token = 1 - held.score(tensor).value, 1 - held.score(token).value
    assert e_token < 0.2 * e_tensor  # per token is much closer to float here
    auto, recs = apply(model, "quantize-int8{mode=dynamic,max_drop=0.05}", data=data)
    st = recs[0].stats
    assert st["per_token"] == ["mm"] and st["layers"][0]["activations"] == "uint8, dynamic per token"
    assert st["sensitivity_points_per_token"]["mm"] < 0.01 * st["all_layers_drop_points"]
    assert 1 - held.score(auto).value == pytest.approx(e_token, rel=1e-3)
    # without data, auto is per tensor (the fast form)
    _, recs = apply(model, "quantize-int8{mode=dynamic}")
    assert recs[0].stats["per_token"] == []


def test_per_channel_where_outlier_channels_need_it():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((64, 64)).astype(np.float32)
    assert per_channel_gain(gauss, 1) < PER_CHANNEL_GAIN
    outliers = gauss.copy()
    outliers[:, :2] *= 30.0
    assert per_channel_gain(outliers, 1) > PER_CHANNEL_GAIN
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "a"], ["h"], name="plain"),
            helper.make_node("MatMul", ["h", "b"], ["y"], name="outl"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 64])],
        [numpy_helper.from_array(gauss, "a"), numpy_helper.from_array(outliers, "b")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    _, recs = apply(model, "quantize-int8{mode=dynamic}")
    forms = {lay["name"]: lay["weights"] for lay in recs[0].stats["layers"]}
    assert forms == {"plain": "int8 per-tensor", "outl": "int8 per-channel"}
    _, recs = apply(model, "quantize-int8{mode=dynamic,per_channel=true}")
    assert {lay["weights"] for lay in recs[0].stats["layers"]} == {"int8 per-channel"}


def test_sensitivity_scan_is_capped_and_names_the_metric(encoder):
    data = token_data(encoder, 300, 16, seed=3)
    _, recs = apply(encoder, "quantize-int8{mode=dynamic,max_drop=0.0,activations=per_tensor}", data=data)
    st = recs[0].stats
    assert st["sensitivity_samples"] == 32 and st["metric"] == "pooled_cosine"
    assert set(st["sensitivity_points"]) == {lay["name"] for lay in st["layers"]} | set(st["kept_float"])
    assert st["kept_float"]  # max_drop=0 cannot be met with every layer quantized
    assert st["final_drop_points"] <= st["all_layers_drop_points"]


def test_binary_says_why_it_leaves_matmuls_and_scores_with_the_metric(encoder):
    data = token_data(encoder, 40, 16, seed=4)
    out, recs = apply(encoder, "quantize-binary", data=data)
    assert recs[0].not_run and "MatMul is not in op_types" in recs[0].not_run
    assert sum("MatMul is not in op_types" in s.reason for s in recs[0].skipped) == 12
    out, recs = apply(encoder, "quantize-binary{op_types=[MatMul]}", data=data)
    st = recs[0].stats
    assert st["binarized"] == 10 and st["metric"] == "pooled_cosine" and st["sensitivity_samples"] == 32
    costs = [lay["drop_points_alone"] for lay in st["layers"]]
    assert len(costs) == 10 and max(costs) > 0


def test_cli_on_unlabelled_token_data_reports_the_models_metric(encoder, tmp_path, capsys):
    import json

    from graphslim.cli import main
    from graphslim.core.ir import save_model

    save_model(encoder, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **token_data(encoder, 50, 16, seed=5).inputs)  # no labels
    args = ["optimize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--no-latency"]
    code = main(
        [*args, "--passes", "quantize-int8{mode=dynamic}", "-o", str(tmp_path / "q"), "--max-accuracy-drop", "0.5"]
    )
    assert code == 0
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    met = rep["metric"]
    assert met["name"] == "pooled_cosine" and met["mask_input"] == "attention_mask" and met["before"] == 1.0
    assert met["samples"] == rep["data"]["eval_samples"] == 10  # held out before any pass
    assert met["after"] >= 0.99 and rep["accuracy"] is None
    b = rep["budgets"]["max_accuracy_drop"]
    assert b["met"] and b["value"] == met["drop_points"] and "points of pooled_cosine" in b["measure"]
    # a budget the model's metric cannot meet: exit 3, measured in points of pooled cosine
    code = main(
        [
            *args,
            "--passes",
            "quantize-binary{op_types=[MatMul]}",
            "-o",
            str(tmp_path / "b"),
            "--max-accuracy-drop",
            "0.01",
        ]
    )
    assert code == 3 and "points of pooled_cosine" in capsys.readouterr().err
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "q" / "model.onnx"),
                "--data",
                str(tmp_path / "d.npz"),
                "--reference",
                str(tmp_path / "m.onnx"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["metric"]["name"] == "pooled_cosine" and out["metric"]["value"] >= 0.99 and out["accuracy"] is None


def test_scan_samples_shrink_for_big_models():
    from graphslim.core.ir import Graph
    from graphslim.transforms.quantization import SCAN_MACS, scan_samples

    w = np.zeros((512, 3, 3, 3), np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512, 224, 224])],
        [numpy_helper.from_array(w, "w")],
    )
    graph = Graph.from_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    graph.infer_shapes()
    data = Dataset({"x": np.zeros((300, 3, 224, 224), np.float32)})
    macs = 224 * 224 * 512 * 27
    n = scan_samples(graph, data, "accuracy", 100)
    assert 4 <= n < 256 and n * macs * 100 <= SCAN_MACS
    assert scan_samples(graph, data, "accuracy", 10_000) == 4  # never fewer than 4
    assert scan_samples(graph, data, "cosine", 1) == 32 and scan_samples(graph, data, "accuracy", 1, requested=5) == 5


def test_a_pass_that_cannot_run_exits_4_with_the_reason_in_a_valid_report(encoder, tmp_path, capsys):
    import json
    from importlib import resources

    import jsonschema

    from graphslim.cli import main
    from graphslim.core.ir import save_model

    save_model(encoder, tmp_path / "m.onnx")
    out = tmp_path / "out"
    code = main(["optimize", str(tmp_path / "m.onnx"), "--passes", "quantize-binary", "-o", str(out), "--no-latency"])
    err = capsys.readouterr().err
    assert code == 4 and "quantize-binary did not run: no layer to binarize" in err
    rep = json.loads((out / "report.json").read_text())
    schema = json.loads(resources.files("graphslim.report").joinpath("schema.json").read_text())
    jsonschema.validate(rep, schema)
    assert rep["not_run"][0]["pass"] == "quantize-binary" and rep["passes"][0]["not_run"]
    assert rep["metric"]["on"] == "random inputs" and rep["metric"]["after"] == 1.0
    assert "did not run" in (out / "report.md").read_text()
