"""The cost model on transformers: MACs of every matmul (attention ones included) with symbolic
dims bound by --shape, parameters, and the per-type breakdown inspect prints."""

from __future__ import annotations

import json

import onnx
import pytest
import transformer_models as tm

from graphslim.analysis.channels import channel_groups
from graphslim.analysis.cost import bind_dims, cost_by_type, cost_model
from graphslim.cli import main
from graphslim.core.ir import Graph


def _graph(model: onnx.ModelProto) -> Graph:
    g = Graph.from_model(onnx.shape_inference.infer_shapes(model))
    g.infer_shapes()
    return g


@pytest.mark.parametrize("kind", tm.KINDS)
@pytest.mark.parametrize(("batch", "seq"), [(1, 16), (2, 48)])
def test_macs_and_params_match_a_hand_count(kind, batch, seq):
    g = _graph(tm.HELPER_BUILDERS[kind]())
    c = cost_model(g, bindings={"B": batch, "S": seq})
    hand = tm.hand_count(kind, batch=batch, seq=seq)
    assert abs(c.macs - hand["macs"]) <= 0.01 * hand["macs"]
    assert abs(c.params - hand["params"]) <= 0.01 * hand["params"]
    assert c.bindings["B"] == batch


def test_bindings_come_from_shapes_and_default_to_one():
    g = _graph(tm.bert_like())
    assert bind_dims(g, {"input_ids": (1, 128)}) == {"B": 1, "S": 128}
    assert bind_dims(g) == {"B": 1, "S": 1}
    with pytest.raises(ValueError, match="not a model input"):
        bind_dims(g, {"tokens": (1, 8)})
    with pytest.raises(ValueError, match="1 dims given, the input has 2"):
        bind_dims(g, {"input_ids": (1,)})


def test_breakdown_by_layer_type():
    g = _graph(tm.llama_like())
    c = cost_model(g, bindings={"B": 1, "S": 16})
    parts = cost_by_type(g, c, channel_groups(g).layer_types(g))
    cfg = tm.make_config("llama")
    h, kv, f, s = cfg.hidden, cfg.kv_heads * cfg.head_dim, cfg.ffn, 16
    assert parts["embeddings"]["params"] == cfg.vocab * h
    assert parts["ffn"]["macs"] == cfg.layers * 3 * s * h * f
    assert parts["attention"]["macs"] == cfg.layers * (2 * s * h * h + 2 * s * h * kv + 2 * s * s * h)
    assert sum(p["macs"] for p in parts.values()) == c.macs


def test_inspect_shape_option_and_json(tmp_path, capsys):
    path = tmp_path / "bert.onnx"
    onnx.save(tm.bert_like(), str(path))
    assert main(["inspect", str(path), "--shape", "input_ids=2x32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bindings"] == {"B": 2, "S": 32}
    assert d["macs"] == tm.hand_count("bert", batch=2, seq=32)["macs"]
    assert set(d["by_type"]) == {"embeddings", "attention", "ffn", "other"}
    assert main(["inspect", str(path), "--shape", "input_ids=2x32"]) == 0
    assert "counted for: B=2, S=32" in capsys.readouterr().out
    assert main(["inspect", str(path), "--shape", "input_ids=2"]) == 2
    assert "1 dims given, the input has 2" in capsys.readouterr().err
