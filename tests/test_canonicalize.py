"""fold-constants, eliminate-identity, eliminate-dead-nodes, fuse-matmul-add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import apply, assert_same_outputs, op_types
from models import ARCHITECTURES, ModelBuilder
from onnx import TensorProto, helper


def test_fold_constants_folds_constant_subgraph():
    b = ModelBuilder("fc", (1, 8))
    k = b.const(np.full(8, 2.0, np.float32), "k")
    kk = b.node("Mul", [k, k], (8,))  # constant * constant
    e = b.node("Exp", [kk], (8,))
    x = b.node("Add", ["input", e], (1, 8))
    model = b.build(b.relu(x))
    out, recs = apply(model, "fold-constants")
    assert op_types(out) == ["Add", "Relu"]
    assert recs[0].stats["nodes_folded"] == 2
    assert_same_outputs(model, out)


def test_fold_constants_on_constant_node_and_shape_chain():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.INT64, [1], [8])),
        helper.make_node("Constant", [], ["m1"], value=helper.make_tensor("m", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["m1", "c"], ["shape"], axis=0),
        helper.make_node("Reshape", ["input", "shape"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out, _ = apply(model, "fold-constants")
    assert op_types(out) == ["Reshape"]
    assert_same_outputs(model, out)


def test_eliminate_identity_and_dropout():
    b = ModelBuilder("id", (1, 8))
    x = b.unary("Identity", "input")
    x = b.relu(x)
    x = b.unary("Dropout", x)
    out_t = b.unary("Identity", x)  # feeds the graph output
    model = b.build(out_t)
    out, recs = apply(model, "eliminate-identity")
    assert op_types(out) == ["Relu"]
    assert recs[0].stats["nodes_removed"] == 3
    assert out.graph.output[0].name == out_t
    assert_same_outputs(model, out)


def test_eliminate_identity_removes_casts_to_the_same_type_only():
    b = ModelBuilder("cast", (1, 8))
    x = b.node("Cast", ["input"], (1, 8), to=TensorProto.FLOAT)  # float -> float: a no-op
    x = b.node("Softmax", [x], (1, 8), axis=-1)
    x = b.node("Cast", [x], (1, 8), to=TensorProto.FLOAT16)  # real casts stay
    model = b.build(b.node("Cast", [x], (1, 8), to=TensorProto.FLOAT))
    out, recs = apply(model, "eliminate-identity")
    assert op_types(out) == ["Softmax", "Cast", "Cast"]
    assert recs[0].stats["nodes_removed"] == 1 and not recs[0].skipped
    assert_same_outputs(model, out)


def test_eliminate_identity_refuses_input_to_output_and_dropout_mask():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    m = helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3])
    nodes = [
        helper.make_node("Identity", ["input"], ["y"], name="id"),
        helper.make_node("Dropout", ["input"], ["d", "mask"], name="drop"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, m]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out, recs = apply(model, "eliminate-identity")
    assert op_types(out) == ["Identity", "Dropout"]
    reasons = {s.where: s.reason for s in recs[0].skipped}
    assert "graph input" in reasons["id"] and "mask" in reasons["drop"]


def test_eliminate_dead_nodes():
    b = ModelBuilder("dead", (1, 8))
    live = b.relu("input")
    b.node("Exp", [b.node("Sigmoid", ["input"], (1, 8))], (1, 8))  # nothing reads these
    model = b.build(live)
    out, recs = apply(model, "eliminate-dead-nodes")
    assert op_types(out) == ["Relu"]
    assert recs[0].stats["nodes_removed"] == 2
    assert_same_outputs(model, out)


def test_fuse_matmul_add_on_mlp():
    model = ARCHITECTURES["mlp"]()
    out, recs = apply(model, "fuse-matmul-add")
    assert op_types(out) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert recs[0].stats["fused"] == 3
    assert_same_outputs(model, out)


def test_fuse_matmul_add_refuses_3d_input():
    b = ModelBuilder("seq", (1, 5, 16))
    model = b.build(b.bias_add(b.matmul("input", 8)))
    out, recs = apply(model, "fuse-matmul-add")
    assert op_types(out) == ["MatMul", "Add"]
    assert "rank 3" in recs[0].skipped[0].reason
    assert_same_outputs(model, out)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_pipeline_is_exact_on_every_architecture(arch):
    from graphslim.passes import DEFAULT_PIPELINE

    model = ARCHITECTURES[arch]()
    out, recs = apply(model, DEFAULT_PIPELINE, verify=True)
    assert all(r.verification and r.verification["max_rel_diff"] <= 1e-4 for r in recs)
    assert "BatchNormalization" not in op_types(out)
    assert len(out.graph.node) <= len(model.graph.node)
    assert_same_outputs(model, out)
    assert out.ir_version <= 10
    onnx.checker.check_model(out, full_check=True)
