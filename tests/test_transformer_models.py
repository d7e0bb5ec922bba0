"""The transformer corpus (tests/transformer_models.py): the onnx.helper models are valid, run,
have the hand-counted parameters and MACs, and mask padding correctly; the Hugging Face exports
(skipped without torch/transformers) match PyTorch and are the same graphs as the helper models.

Structure is compared three ways, from strict to coarse: ``graph_signature`` (the same DAG of
ops, attributes and constants, names and weight values aside), op-type counts per layer, and the
outputs of the helper model built from the export's weights against PyTorch. There are no known
differences: the helper models are node-for-node copies of the transformers 5.24 / torch 2.13
exports, and a different exporter version that changes the graph fails these tests by design.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import transformer_models as tm
from models import run
from onnx import TensorProto, helper

SHAPES = [(2, 16), (1, 7)]  # (batch, seq); ViT ignores seq
TOL = 1e-4


@pytest.fixture(scope="module")
def helper_models() -> dict[str, onnx.ModelProto]:
    return {kind: build() for kind, build in tm.HELPER_BUILDERS.items()}


@pytest.fixture(scope="module")
def hf() -> None:
    """Skips without torch/transformers, also when an install is broken (plain ImportError)."""
    pytest.importorskip("torch", exc_type=ImportError)
    pytest.importorskip("transformers", exc_type=ImportError)


def expected_shape(kind: str, cfg: tm.Config, batch: int, seq: int) -> tuple[int, ...]:
    if kind == "vit":
        return (batch, cfg.tokens, cfg.hidden)
    return (batch, seq, cfg.hidden if kind == "bert" else cfg.vocab)


def n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)


def measured_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """MACs of every MatMul, Gemm and Conv, from the shapes ONNX Runtime actually produces (the
    head reshapes are computed at run time, so static shape inference alone cannot be trusted)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {t.name: list(t.dims) for t in probe.graph.initializer}
    heavy = [n for n in probe.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    exposed = {vi.name for vi in probe.graph.output}
    for name in dict.fromkeys(x for n in heavy for x in (n.input[0], n.output[0])):
        if name not in exposed and name not in inits:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    names = [vi.name for vi in probe.graph.output]
    shapes = {name: value.shape for name, value in zip(names, run(probe, feeds), strict=True)}
    total = 0
    for n in heavy:
        out, a = shapes[n.output[0]], shapes.get(n.input[0], inits.get(n.input[0]))
        k = int(np.prod(inits[n.input[1]][1:])) if n.op_type == "Conv" else a[-1]
        total += int(np.prod(out)) * k
    return total


# --------------------------------------------------------------------------- onnx.helper models


@pytest.mark.parametrize("kind", tm.KINDS)
def test_helper_model_checks_and_runs(kind: str, helper_models: dict[str, onnx.ModelProto]) -> None:
    model = helper_models[kind]
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == tm.OPSET and model.ir_version <= tm.MAX_IR_VERSION
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "B" and (kind == "vit" or dims[1] == "S")
    cfg = tm.make_config(kind)
    for batch, seq in SHAPES:
        out = run(model, tm.sample_inputs_for(model, batch, seq))[0]
        assert out.shape == expected_shape(kind, cfg, batch, seq)
        assert np.isfinite(out).all() and out.std() > 1e-3


@pytest.mark.parametrize("kind", tm.KINDS)
def test_helper_model_counts(kind: str, helper_models: dict[str, onnx.ModelProto]) -> None:
    model = helper_models[kind]
    for batch, seq in SHAPES:
        counts = tm.hand_count(kind, tm.make_config(kind), batch, seq)
        assert n_params(model) == counts["params"]
        assert measured_macs(model, tm.sample_inputs_for(model, batch, seq)) == counts["macs"]


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llama", {"hidden": 96, "heads": 6, "kv_heads": 2, "layers": 3, "ffn": 160, "vocab": 1000}),
        ("llama", {"kv_heads": 4}),  # plain multi-head attention: no repeat_kv
        ("bert", {"hidden": 48, "heads": 3, "layers": 1, "ffn": 96, "max_positions": 32}),
        ("gpt2", {"hidden": 32, "heads": 2, "layers": 3, "vocab": 700}),
        ("vit", {"image": 48, "patch": 16, "channels": 1}),
    ],
)
def test_helper_model_options(kind: str, overrides: dict[str, int]) -> None:
    model = tm.HELPER_BUILDERS[kind](seed=3, **overrides)
    cfg = tm.make_config(kind, **overrides)
    feeds = tm.sample_inputs_for(model, 2, 9, seed=1)
    assert run(model, feeds)[0].shape == expected_shape(kind, cfg, 2, 9)
    counts = tm.hand_count(kind, cfg, 2, 9)
    assert n_params(model) == counts["params"]
    assert measured_macs(model, feeds) == counts["macs"]


def test_helper_model_static_dims() -> None:
    model = tm.llama_like(batch=1, seq=8)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 8, 512]
    assert run(model, tm.sample_inputs_for(model, 1, 8))[0].shape == (1, 8, 512)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_helper_model_masks_padding(kind: str, helper_models: dict[str, onnx.ModelProto]) -> None:
    """A right-padded row gives, at its real tokens, what the unpadded row gives alone; for the
    decoders, a prefix gives what the whole sequence gives at the prefix (causality)."""
    model = helper_models[kind]
    feeds = tm.sample_inputs_for(model, 2, 12)
    n = int(feeds["attention_mask"][-1].sum())
    assert 0 < n < 12
    padded = run(model, feeds)[0][-1, :n]
    alone = run(model, {k: v[-1:, :n] for k, v in feeds.items()})[0][0]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=1e-4)
    if kind != "bert":
        prefix = run(model, {k: v[:1, :5] for k, v in feeds.items()})[0][0]
        np.testing.assert_allclose(run(model, feeds)[0][0, :5], prefix, atol=1e-5, rtol=1e-4)


def test_sample_inputs_and_pooled_cosine(helper_models: dict[str, onnx.ModelProto]) -> None:
    feeds = tm.sample_inputs_for(helper_models["gpt2"], 3, 8, seed=2)
    assert feeds["input_ids"].dtype == np.int64 and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 512
    assert feeds["attention_mask"][:-1].all() and feeds["attention_mask"][-1].tolist() == [1] * 6 + [0] * 2
    stripped = onnx.ModelProto()
    stripped.CopyFrom(helper_models["gpt2"])
    del stripped.metadata_props[:]  # falls back to the embedding table's rows
    assert tm.sample_inputs_for(stripped, 3, 8, seed=2)["input_ids"].tolist() == feeds["input_ids"].tolist()
    assert tm.sample_inputs_for(helper_models["vit"], 2)["pixel_values"].shape == (2, 3, 32, 32)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 5, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    b = a.copy()
    b[1, 2:] = rng.standard_normal((3, 4))  # padding only
    assert tm.pooled_cosine(a, b, mask) == pytest.approx(1.0)
    assert tm.pooled_cosine(a, b) < 1.0
    assert tm.pooled_cosine(a, -a, mask) == pytest.approx(-1.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        tm.make_config("t5")
    with pytest.raises(TypeError, match="unknown config"):
        tm.make_config("bert", hiden=64)
    with pytest.raises(ValueError, match="divide"):
        tm.make_config("llama", heads=4, kv_heads=3)
    assert tm.make_config("bert", kv_heads=1).kv_heads == 4  # only Llama has grouped K/V
    with pytest.raises(ValueError, match="weights not used"):
        tm.bert_like(weights={"no.such.weight": np.zeros(3)})


# --------------------------------------------------------------------------- Hugging Face exports


@pytest.mark.parametrize("kind", tm.KINDS)
def test_export_matches_torch(kind: str, hf: None) -> None:
    model = tm.export_hf(kind)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == tm.OPSET and model.ir_version <= tm.MAX_IR_VERSION
    for batch, seq in SHAPES:
        feeds = tm.sample_inputs_for(model, batch, seq, seed=4)
        out = run(model, feeds)[0]
        ref = tm.hf_reference(kind, feeds)
        assert out.shape == ref.shape == expected_shape(kind, tm.make_config(kind), batch, seq)
        assert np.abs(out - ref).max() < TOL


@pytest.mark.parametrize("kind", tm.KINDS)
def test_export_structure_is_the_helper_models(kind: str, hf: None, helper_models: dict[str, onnx.ModelProto]) -> None:
    exported, built = tm.export_hf(kind), helper_models[kind]
    by_layer = tm.layer_op_counts(exported)
    assert set(by_layer) == {"other", "layer0", "layer1"}
    assert by_layer == tm.layer_op_counts(built)
    sig_export, sig_built = tm.graph_signature(exported), tm.graph_signature(built)
    assert sig_export == sig_built, (sig_export - sig_built, sig_built - sig_export)
    assert n_params(exported) == tm.hand_count(kind)["params"]


@pytest.mark.parametrize("kind", tm.KINDS)
def test_helper_with_hf_weights_matches_torch(kind: str, hf: None) -> None:
    model = tm.HELPER_BUILDERS[kind](weights=tm.hf_weights(kind))
    feeds = tm.sample_inputs_for(model, 2, 16, seed=5)
    assert np.abs(run(model, feeds)[0] - tm.hf_reference(kind, feeds)).max() < TOL


def test_export_other_config(hf: None) -> None:
    """Grouped-query attention with 3 query heads per K/V head, 3 layers, odd sizes."""
    sizes = {"hidden": 96, "heads": 6, "kv_heads": 2, "layers": 3, "ffn": 160, "vocab": 1000}
    exported = tm.export_hf("llama", seed=1, **sizes)
    assert tm.graph_signature(exported) == tm.graph_signature(tm.llama_like(**sizes))
    feeds = tm.sample_inputs_for(exported, 3, 11)
    assert np.abs(run(exported, feeds)[0] - tm.hf_reference("llama", feeds, seed=1, **sizes)).max() < TOL


def test_export_cache(hf: None, tmp_path: Path) -> None:
    tmp = tmp_path
    first = tm.export_hf("vit", tmp / "vit.onnx", seed=7, cache_dir=tmp / "cache")
    assert onnx.load(tmp / "vit.onnx") == first
    assert len(list((tmp / "cache").glob("vit-*.onnx"))) == 1
    assert tm.export_hf("vit", seed=7) == first  # from memory, a fresh copy
    first.graph.node.pop()
    assert tm.export_hf("vit", seed=7) != first
    del tm._EXPORTS[("vit", tm.make_config("vit"), 7)]  # now only on disk
    assert tm.export_hf("vit", seed=7, cache_dir=tmp / "cache").SerializeToString() == (tmp / "vit.onnx").read_bytes()
    assert {p.key: p.value for p in tm.export_hf("vit", seed=7).metadata_props}[tm.META_KIND] == "vit"
