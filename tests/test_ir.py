from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs
from models import ModelBuilder, plain_cnn
from onnx import TensorProto, helper, numpy_helper

from graphslim.core.errors import InputError
from graphslim.core.ir import Graph, load_model, save_model


def _save(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"this is not a protobuf \x00\xff\x17", "not a valid ONNX model")],
)
def test_load_rejects_garbage(tmp_path, content, message):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_model(p)


def test_load_rejects_missing_and_truncated(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    data = plain_cnn().SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(p)


def test_load_rejects_checker_failure(tmp_path):
    model = plain_cnn()
    model.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(InputError, match="onnx.checker|shape inference"):
        load_model(_save(model, tmp_path / "m.onnx"))


@pytest.mark.parametrize("opset", [8, 22])
def test_load_rejects_unsupported_opset(tmp_path, opset):
    b = ModelBuilder("m", (1, 4), opset=opset)
    model = b.build(b.relu("input"))
    with pytest.raises(InputError, match=f"unsupported opset {opset}"):
        load_model(_save(model, tmp_path / "m.onnx"))


def test_old_opset_is_normalized_to_13(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 6])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("a", "b")]
    node = helper.make_node("Split", ["input"], ["a", "b"], axis=1, split=[3, 3])  # attribute form (opset 11)
    model = helper.make_model(helper.make_graph([node], "g", [x], ys), opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    assert [o.version for o in loaded.opset_import if o.domain == ""] == [13]
    split = next(n for n in loaded.graph.node if n.op_type == "Split")
    assert len(split.input) == 2 and not split.attribute[1:]  # split sizes became an input
    assert_same_outputs(model, loaded)


def test_external_data_outside_model_folder_is_refused(tmp_path):
    b = ModelBuilder("m", (1, 4))
    model = b.build(b.relu(b.node("Add", ["input", b.const(np.ones(4, np.float32), "k")], (1, 4))))
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../secret.bin")
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(InputError, match="outside the model's folder"):
        load_model(_save(model, folder / "m.onnx"))


def test_external_data_inside_folder_loads(tmp_path):
    model = plain_cnn()
    onnx.save_model(
        plain_cnn(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
    )
    assert (tmp_path / "m.data").stat().st_size > 0
    loaded = load_model(tmp_path / "m.onnx")
    assert_same_outputs(model, loaded)


def test_save_is_atomic_and_clamps_ir_version(tmp_path):
    model = plain_cnn()
    model.ir_version = 11
    p = tmp_path / "sub" / "out.onnx"
    save_model(model, p)
    assert onnx.load(str(p)).ir_version == 10
    assert [f.name for f in p.parent.iterdir()] == ["out.onnx"]  # no temporary left behind


def test_facade_use_def_and_set_constant_on_shared_tensor():
    b = ModelBuilder("m", (1, 4))
    k = b.const(np.ones(4, np.float32), "k")
    a1 = b.node("Add", ["input", k], (1, 4))
    a2 = b.node("Mul", [a1, k], (1, 4))
    model = b.build(a2)
    g = Graph.from_model(model)
    add, mul = g.nodes
    assert g.producer(add.outputs[0]) is add
    assert g.consumers(add.outputs[0]) == [mul]
    assert g.producer(g.inputs[0]) is None
    shared = add.inputs[1]
    new = g.set_constant(add, 1, np.full(4, 3.0, np.float32))
    assert new is not shared  # the Mul still reads the old value
    assert np.array_equal(g.constant(mul.inputs[1]), np.ones(4))
    assert np.array_equal(g.constant(add.inputs[1]), np.full(4, 3.0))
    # Now only Mul reads `shared`: editing it happens in place.
    assert g.set_constant(mul, 1, np.zeros(4, np.float32)) is shared


def test_fresh_names_are_unique_and_deterministic():
    g1, g2 = Graph.from_model(plain_cnn()), Graph.from_model(plain_cnn())
    n1 = [g1.fresh_name("conv1") for _ in range(3)]
    n2 = [g2.fresh_name("conv1") for _ in range(3)]
    assert n1 == n2 and len(set(n1)) == 3
    assert not set(n1) & {n.name for n in g1.nodes}


def test_bypass_reroutes_graph_output():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    g = Graph.from_model(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
    ident = g.nodes[1]
    assert g.bypass(ident) is None
    assert [n.op for n in g.nodes] == ["Relu"] and g.nodes[0].outputs[0].name == "y"


def test_roundtrip_is_byte_identical():
    from graphslim.core.ir import model_bytes

    # plain_cnn is already in topological order (nothing for to_model to reorder); to_model writes
    # the model-level fields even when empty, so the original sets them all.
    m = plain_cnn()
    m.doc_string, m.domain, m.model_version, m.producer_version = "a model", "tests.graphslim", 3, "1.0"
    m.metadata_props.add(key="source", value="test_ir")
    m.opset_import.add(domain="com.microsoft", version=1)
    a = model_bytes(Graph.from_model(m).to_model())
    # The same bytes as the original: nodes, initializers (dtype and values), inputs, outputs,
    # model-level fields and opset imports all survive the IR.
    assert a == model_bytes(m)
    # And a fixed point: a second round trip changes nothing.
    assert model_bytes(Graph.from_model(onnx.load_from_string(a)).to_model()) == a
    assert numpy_helper.to_array(onnx.load_from_string(a).graph.initializer[0]).dtype == np.float32
