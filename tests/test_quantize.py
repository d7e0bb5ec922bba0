"""quantize-int8 and quantize-binary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import apply, assert_same_outputs, op_types
from models import ARCHITECTURES, ModelBuilder, run, sample_inputs
from onnx import numpy_helper

from graphslim.core.data import Dataset
from graphslim.core.errors import InputError, PassError


def _data(model: onnx.ModelProto, n: int = 64, labels: bool = False, seed: int = 0) -> Dataset:
    feeds = sample_inputs(model, n, seed)
    y = np.argmax(run(model, feeds)[0], axis=1) if labels else None  # labels = the float model's answers
    return Dataset(feeds, y)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


@pytest.mark.parametrize("arch", ["plain_cnn", "resnet", "mlp"])
def test_static_int8_inserts_qdq_and_shrinks_weights(arch):
    model, _ = apply(ARCHITECTURES[arch](), "fold-batchnorm")
    out, recs = apply(model, "quantize-int8{sensitivity=false}", data=_data(model), verify=True)
    ops = op_types(out)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8 = [i for i in out.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8  # weights stored as int8
    assert _weight_bytes(out) < 0.4 * _weight_bytes(model)
    ver = recs[0].verification
    assert ver["cosine"] > 0.99 and ver["runs"]
    assert recs[0].stats["quantized"] == recs[0].stats["candidates"]


def test_static_without_data_is_a_clear_error():
    with pytest.raises(PassError, match="needs|calibrates on a data set") as e:
        apply(ARCHITECTURES["mlp"](), "quantize-int8")
    assert isinstance(e.value.cause, InputError)


@pytest.mark.parametrize("arch", ["mlp", "plain_cnn"])
def test_dynamic_mode_needs_no_data(arch):
    model = ARCHITECTURES[arch]()
    out, _ = apply(model, "quantize-int8{mode=dynamic}")
    assert "MatMulInteger" in op_types(out) or "ConvInteger" in op_types(out)
    # Runs in this ONNX Runtime, close to float: the worst output error measured was 1.5% (mlp)
    # and 1.7% (plain_cnn) of the largest output, with the same seeds.
    assert_same_outputs(model, out, rtol=0, atol=0.02)


def test_sensitivity_keeps_worst_layers_in_float_until_budget():
    model, _ = apply(ARCHITECTURES["plain_cnn"](), "fold-batchnorm")
    data = _data(model, 400, labels=True)
    out, recs = apply(model, "quantize-int8{max_drop=4.0,calibration=percentile,percentile=99.0}", data=data)
    st = recs[0].stats
    # Measured on this model and data: every layer in int8 loses 8.33 points; alone, conv2 and
    # conv11 cost 4.17 each, gemm23 and gemm27 2.08 each; with the two convs in float, 3.47.
    assert st["all_layers_drop_points"] > 4.0  # over the budget: the scan has to choose
    costs = st["sensitivity_points"]
    assert set(costs) == {lay["name"] for lay in st["layers"]} | set(st["kept_float"])
    kept, quantized = st["kept_float"], [lay["name"] for lay in st["layers"]]
    assert len(kept) == 2 and len(quantized) == 2 == st["quantized"]
    # The most sensitive layers go back to float, worst first, and only as many as the budget needs.
    assert kept == sorted(kept, key=lambda n: -costs[n])
    assert min(costs[n] for n in kept) >= max(costs[n] for n in quantized)
    assert st["final_drop_points"] <= 4.0
    assert not any("cannot be met" in s.reason for s in recs[0].skipped)
    assert {s.where for s in recs[0].skipped if "kept in float" in s.reason} == set(kept)
    # The model agrees: the kept layers read float weights, the others int8 ones through a DequantizeLinear.
    dq_outputs = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    weight_dq = {n.name for n in out.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq_outputs}
    assert weight_dq == set(quantized)
    # Its accuracy against the float model's answers on all 400 samples is within the budget too
    # (measured: 96.5%, a 3.5 point drop; 91.5% with every layer in int8).
    agree = float(np.mean(np.argmax(run(out, dict(data.inputs))[0], axis=1) == data.labels))
    assert 100 * (1 - agree) <= 4.0


def test_binary_is_exact_on_weights_already_binary():
    b = ModelBuilder("bin", (1, 4, 8, 8))
    x = b.relu(b.conv("input", 8))
    rng = np.random.default_rng(0)
    alpha = rng.uniform(0.1, 1.0, (8, 1, 1, 1)).astype(np.float32)
    w = (np.where(rng.standard_normal((8, 8, 3, 3)) > 0, 1, -1) * alpha).astype(np.float32)
    x = b.relu(b.node("Conv", [x, b.const(w)], (1, 8, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    model = b.build(b.gemm(b.flatten(b.gap(x)), 5))
    out, recs = apply(model, "quantize-binary")
    assert recs[0].stats["binarized"] == 1  # first conv and last gemm stay float
    assert {s.reason.split(" (")[0] for s in recs[0].skipped} == {
        "first or last weight layer stays in higher precision"
    }
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    signs = inits[dq.input[0]]
    assert signs.dtype == np.int8 and set(np.unique(signs)) == {-1, 1}
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch, opts", [("resnet", ""), ("mlp", "op_types=[MatMul],"), ("plain_cnn", "scale=per_tensor,")]
)
def test_binary_on_networks(arch, opts):
    model = ARCHITECTURES[arch]()
    out, recs = apply(
        model, f"quantize-binary{{{opts}skip_first_last=true}}", data=_data(model, 32, labels=True), verify=True
    )
    assert recs[0].stats["binarized"] >= 1
    for lay in recs[0].stats["layers"]:
        assert "accuracy_drop_points_alone" in lay
    assert op_types(out).count("DequantizeLinear") == recs[0].stats["binarized"]
    assert recs[0].verification["runs"]


def test_calibration_reader_keeps_its_batches_alive():
    """ONNX Runtime hands back graph inputs that are also outputs as views of the caller's arrays,
    without holding them; the entropy and percentile calibrators read those views after the last
    batch. The reader must keep every batch alive until it is dropped (it once let them go when its
    iterator ran out, and percentile calibration failed at random on NaN read from freed memory)."""
    import gc
    import weakref

    from onnx import TensorProto, helper

    from graphslim.transforms.quantization import CalibrationReader

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    reader = CalibrationReader(Dataset({"x": np.arange(40, dtype=np.float32).reshape(10, 4)}), model, batch=4)
    first = weakref.ref(reader.get_next()["x"])
    while reader.get_next() is not None:
        pass
    gc.collect()
    assert first() is not None and first()[0, 0] == 0.0
