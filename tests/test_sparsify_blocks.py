from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import apply
from models import ARCHITECTURES, run, sample_inputs

from graphslim.analysis.sparsity import block_norms, block_sparsity
from graphslim.core.ir import Graph
from graphslim.core.ops import weight_matrix


def _matrices(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    g = Graph.from_model(model)
    return {
        n.name: m for n in g.nodes if n.op in ("Conv", "Gemm", "MatMul") for m in [weight_matrix(g, n)] if m is not None
    }


@pytest.mark.parametrize("block", [(1, 4), (4, 4), (16, 1)])
@pytest.mark.parametrize("arch", ["resnet", "mlp", "plain_cnn"])
def test_layer_sparsity_hits_target_with_smallest_blocks(arch, block):
    model = ARCHITECTURES[arch]()
    out, recs = apply(model, f"sparsify-blocks{{sparsity=0.75,block=[{block[0]},{block[1]}]}}", verify=True)
    before, after = _matrices(model), _matrices(out)
    assert before.keys() == after.keys()
    for name, m in before.items():
        a = after[name]
        assert a.shape == m.shape
        norms = block_norms(m, block).reshape(-1)
        expect = np.floor(0.75 * norms.size) / norms.size
        assert block_sparsity(a, block) == pytest.approx(expect)
        kept = block_norms(a, block).reshape(-1) > 0
        if kept.any() and (~kept).any():
            assert norms[~kept].max() <= norms[kept].min() + 1e-6  # the smallest blocks went
        assert np.array_equal(a[a != 0], m[a != 0])  # the rest is untouched
    assert recs[0].verification["runs"]


def test_global_scope_and_exclude():
    model = ARCHITECTURES["plain_cnn"]()
    first = model.graph.node[0].name
    out, recs = apply(model, f"sparsify-blocks{{sparsity=0.5,scope=global,exclude=[{first}]}}")
    before, after = _matrices(model), _matrices(out)
    assert np.array_equal(before[first], after[first])
    total = sum(block_norms(m, (1, 4)).size for n, m in before.items() if n != first)
    zero = sum(block_sparsity(after[n], (1, 4)) * block_norms(m, (1, 4)).size for n, m in before.items() if n != first)
    assert zero == pytest.approx(np.floor(0.5 * total), abs=1)
    assert any(s.where == first for s in recs[0].skipped)


def test_zero_sparsity_changes_nothing_and_model_still_runs():
    model = ARCHITECTURES["densenet"]()
    out, recs = apply(model, "sparsify-blocks{sparsity=0.0}")
    assert recs[0].changed is False
    feeds = sample_inputs(model)
    for a, b in zip(run(model, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inspect_reports_block_sparsity(tmp_path, capsys):
    from graphslim.cli import main

    out, _ = apply(ARCHITECTURES["mlp"](), "sparsify-blocks{sparsity=0.9,block=[16,1]}")
    p = tmp_path / "m.onnx"
    p.write_bytes(out.SerializeToString())
    assert main(["inspect", str(p), "--json"]) == 0
    layers = [lay for lay in json.loads(capsys.readouterr().out)["layers"] if lay["op"] == "MatMul"]
    assert layers and all(lay["block_sparsity"]["16x1"] >= 0.85 for lay in layers)


def test_layer_sparsity_sets_single_layers():
    model = ARCHITECTURES["mlp"]()
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    out, recs = apply(
        model,
        f'sparsify-blocks{{sparsity=0.0,block=[4,4],layer_sparsity=["{names[0]}=0.75","{names[2]}=0.5","x=0.5"]}}',
    )
    mats = _matrices(out)
    assert block_sparsity(mats[names[0]], (4, 4)) == pytest.approx(0.75, abs=0.02)
    assert block_sparsity(mats[names[1]], (4, 4)) == 0.0  # not named: sparsity=0
    assert block_sparsity(mats[names[2]], (4, 4)) == pytest.approx(0.5, abs=0.05)
    assert any(s.where == "x" and "names no" in s.reason for s in recs[0].skipped)
    out, _ = apply(model, f'sparsify-blocks{{sparsity=0.5,block=[4,4],layer_sparsity=["{names[0]}=0.0"]}}')
    mats = _matrices(out)
    assert block_sparsity(mats[names[0]], (4, 4)) == 0.0
    assert block_sparsity(mats[names[1]], (4, 4)) == pytest.approx(0.5, abs=0.02)
    from graphslim.core.errors import PipelineError
    from graphslim.pipeline import Pipeline

    with pytest.raises(PipelineError, match="scope=layer"):
        Pipeline.parse('sparsify-blocks{scope=global,layer_sparsity=["a=0.5"]}')
