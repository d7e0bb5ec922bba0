from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import apply, assert_same_outputs, op_types
from models import ARCHITECTURES, ZOO_STYLE, ModelBuilder, run, sample_inputs
from onnx import numpy_helper

from graphslim.analysis.channels import channel_groups
from graphslim.core.ir import Graph

ZERO_PARAMS = {
    ("BatchNormalization", 2),
    ("BatchNormalization", 3),
    ("Conv", 2),
    ("Add", 1),
    ("Sub", 1),
    ("Add", 0),
    ("Gemm", 2),
}


def _graph(model: onnx.ModelProto) -> Graph:
    g = Graph.from_model(onnx.shape_inference.infer_shapes(model))
    g.infer_shapes()
    return g


def _n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def zero_channels(model: onnx.ModelProto, ratio: float, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """Make ``ratio`` of the channels of every prunable group dead: producer rows, biases and
    BatchNorm shifts zero (so the channel is exactly 0 everywhere), consumer columns zero too (so
    any magnitude criterion ranks them last). Returns the model and how many channels died."""
    g = _graph(model)
    g.fold_constant_subexpressions()  # zoo-style BatchNorm scales reach their Mul via an Unsqueeze
    an = channel_groups(g)
    rng = np.random.default_rng(seed)
    dead_total = 0
    for grp in an.groups:
        if not grp.prunable or grp.kind != "channels":
            continue
        classes = sorted(set(grp.classes))
        members = [[i for i, c in enumerate(grp.classes) if c == k] for k in classes]
        k = int(np.floor(ratio * grp.size + 1e-9)) // len(classes)
        if k == 0:
            continue
        dead = np.concatenate([rng.choice(m, k, replace=False) for m in members])
        dead_total += len(dead)
        dead_chans = {r: np.concatenate([grp.units[i][r] for i in dead if r in grp.units[i]]) for r in grp.roots}
        for _, u in an.group_uses(grp):
            w = g.constant(u.node.inputs[u.index]).copy()
            hit = np.isin(u.chans, dead_chans[u.root])
            idx = (u.starts[hit][:, None] + np.arange(u.rep)[None, :]).reshape(-1)
            if u.kind == "group_in":
                groups = int(u.node.attrs["group"])
                cpg, opg = w.shape[1], w.shape[0] // groups
                for d in idx:
                    gi = d // cpg
                    w[gi * opg : (gi + 1) * opg, d % cpg] = 0
            else:
                if (
                    u.kind == "param"
                    and (u.node.op, u.index) not in ZERO_PARAMS
                    and not (u.node.op == "Conv" and u.index == 1)
                ):
                    continue
                view = np.moveaxis(w, u.axis, 0)
                view[idx] = 0
            g.set_constant(u.node, u.index, w)
    return g.to_model(), dead_total


ALL = {**ARCHITECTURES, **ZOO_STYLE}


@pytest.mark.parametrize("arch", sorted(ALL))
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_dead_channels_are_removed_exactly(arch, criterion):
    model, dead = zero_channels(ALL[arch](), 0.5)
    assert dead > 0
    out, recs = apply(model, f"prune-channels{{ratio=0.5,criterion={criterion}}}")
    st = recs[0].stats
    assert st["channels_removed"] == dead  # exactly the dead ones went
    assert _n_params(out) < _n_params(model)
    # Same interface, same numbers.
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    feeds = sample_inputs(model)
    for a, b in zip(run(model, feeds), run(out, feeds), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_half_ratio_removes_at_least_40_percent_of_parameters(arch):
    model = ARCHITECTURES[arch]()
    out, recs = apply(model, "prune-channels{ratio=0.5}", verify=True)
    assert _n_params(out) <= 0.6 * _n_params(model)
    assert recs[0].verification["runs"] is True
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    ref, new = run(model, sample_inputs(model)), run(out, sample_inputs(model))
    assert [r.shape for r in ref] == [n.shape for n in new]


def test_groups_of_resnet_couple_residual_and_projection():
    g = _graph(ARCHITECTURES["resnet"]())
    an = channel_groups(g)
    sizes = sorted((grp.size, len(grp.roots)) for grp in an.groups if grp.prunable)
    # stem + identity block share one group (3 convs: stem, block conv2); strided block: conv2 + projection
    assert (16, 2) in sizes and (32, 2) in sizes
    assert sum(1 for grp in an.groups if grp.prunable) == 4


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _kept(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Indices (along axis 0) of the slices of ``before`` that ``after`` kept, in order; the test
    models' random weights make every slice unique."""
    flat = before.reshape(len(before), -1)
    idx = [int(np.flatnonzero((flat == row).all(axis=1))[0]) for row in after.reshape(len(after), -1)]
    assert len(set(idx)) == len(idx)
    return np.array(idx)


def test_concat_offsets_and_depthwise_group_attribute():
    model = ARCHITECTURES["densenet"]()
    out, _ = apply(model, "prune-channels{ratio=0.5}")
    a, b = _inits(model), _inits(out)
    nodes = {n.name: n for n in out.graph.node}
    # Each concatenation's kept channels are its inputs' kept channels, shifted by the input's
    # offset in the original concatenation: the stem (16 channels), then 8 per dense layer.
    concat, offset = _kept(a["b2"], b["b2"]), 16
    for conv, grown in (("conv12", "conv22"), ("conv22", "conv32"), ("conv32", "conv42")):
        bias = nodes[conv].input[2]
        assert len(b[bias]) == 4  # 8 channels, half pruned
        concat, offset = np.concatenate([concat, offset + _kept(a[bias], b[bias])]), offset + 8
        # The layer reading the concatenation keeps exactly those input columns, in that order.
        w_in, bias_in = nodes[grown].input[1], nodes[grown].input[2]
        rows = _kept(a[bias_in], b[bias_in])
        np.testing.assert_array_equal(b[w_in], a[w_in][rows][:, concat])
    assert [len(b[nodes[c].input[1]][0]) for c in ("conv22", "conv32", "conv42")] == [12, 16, 20]
    model = ARCHITECTURES["mobilenetv2"]()
    out, _ = apply(model, "prune-channels{ratio=0.5}")
    a, b = _inits(model), _inits(out)
    producers = {o: n for n in out.graph.node for o in n.output}
    depthwise = {}
    for n in out.graph.node:
        group = next((at.i for at in n.attribute if at.name == "group"), 1)
        if n.op_type == "Conv" and group > 1:
            w = b[n.input[1]]
            depthwise[n.name] = (group, w.shape)
            # The group follows the channels, and the depthwise filters kept are those of the
            # channels the expanding 1x1 conv kept (its BatchNorm's scale tells which).
            bn = producers[producers[n.input[0]].input[0]]  # Clip <- BatchNormalization
            assert bn.op_type == "BatchNormalization"
            np.testing.assert_array_equal(_kept(a[n.input[1]], w), _kept(a[bn.input[1]], b[bn.input[1]]))
    assert depthwise == {"conv22": (32, (32, 1, 3, 3)), "conv50": (32, (32, 1, 3, 3)), "conv77": (48, (48, 1, 3, 3))}


def test_grouped_conv_keeps_equal_channels_per_group():
    out, recs = apply(ARCHITECTURES["grouped"](), "prune-channels{ratio=0.5}")
    inits = {i.name: i for i in out.graph.initializer}
    grouped = [
        n for n in out.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 4 for a in n.attribute)
    ]
    assert len(grouped) == 2
    for n in grouped:
        assert inits[n.input[1]].dims[0] % 4 == 0


def test_round_to_and_min_channels():
    out, recs = apply(ARCHITECTURES["plain_cnn"](), "prune-channels{ratio=0.7,round_to=8}")
    for pg in recs[0].stats["pruned_groups"]:
        assert pg["channels"][1] % 8 == 0
    out, recs = apply(ARCHITECTURES["plain_cnn"](), "prune-channels{ratio=0.99,min_channels=3}")
    assert all(pg["channels"][1] == 3 for pg in recs[0].stats["pruned_groups"])


def test_global_scope_and_targets():
    model = ARCHITECTURES["resnet"]()
    out, recs = apply(model, "prune-channels{ratio=0.5,scope=global}")
    assert recs[0].stats["channels_after"] == recs[0].stats["channels_before"] - recs[0].stats["channels_removed"]
    g0 = _graph(model)
    from graphslim.analysis.cost import cost_model

    base = cost_model(g0)
    for key, option in (("macs", "target_macs"), ("params", "target_params")):
        out, recs = apply(model, f"prune-channels{{{option}=0.4}}")
        got = getattr(cost_model(_graph(out)), key)
        assert got <= 0.4 * getattr(base, key)
        assert got >= 0.25 * getattr(base, key)  # not far below: the search finds the edge
        assert recs[0].stats["target_reached"] is True


def test_bn_gamma_uses_batchnorm_and_random_is_seeded():
    model = ARCHITECTURES["plain_cnn"]()
    g = _graph(model)
    bn = next(n for n in g.nodes if n.op == "BatchNormalization")
    gamma = g.constant(bn.inputs[1]).copy()
    gamma[:8] = 1e-6  # these channels matter least by Network Slimming
    g.set_constant(bn, 1, gamma)
    m = g.to_model()
    out, recs = apply(m, "prune-channels{ratio=0.5,criterion=bn-gamma}")
    conv = _graph(out)
    first = next(n for n in conv.nodes if n.op == "BatchNormalization")
    assert np.all(conv.constant(first.inputs[1]) > 1e-3)  # the small-gamma channels were removed
    a, _ = apply(m, "prune-channels{ratio=0.5,criterion=random}", seed=1)
    b, _ = apply(m, "prune-channels{ratio=0.5,criterion=random}", seed=1)
    c, _ = apply(m, "prune-channels{ratio=0.5,criterion=random}", seed=2)
    assert a.SerializeToString() == b.SerializeToString() != c.SerializeToString()


def test_exclude_leaves_group_alone():
    model = ARCHITECTURES["plain_cnn"]()
    first_conv = model.graph.node[0].name
    out, recs = apply(model, f"prune-channels{{ratio=0.5,exclude=[{first_conv}]}}")
    assert any("excluded" in s.reason for s in recs[0].skipped)
    assert out.graph.initializer[0].dims[0] == model.graph.initializer[0].dims[0]


def _misc_model() -> onnx.ModelProto:
    """Split on concat boundaries, SE gating, PRelu, Pad, Transpose, Reshape with explicit sizes."""
    b = ModelBuilder("misc", (1, 3, 8, 8))
    a = b.relu(b.conv("input", 8))
    c = b.relu(b.conv("input", 8))
    cat = b.concat([a, c])
    sizes = b.const(np.array([8, 8], np.int64), "split")
    b.nodes.append(onnx.helper.make_node("Split", [cat, sizes], ["s1", "s2"], name="split", axis=1))
    b.shapes["s1"] = b.shapes["s2"] = (1, 8, 8, 8)
    x = b.add(b.conv("s1", 12), b.conv("s2", 12))
    slope = b.const(np.full((12, 1, 1), 0.1, np.float32), "slope")
    x = b.node("PRelu", [x, slope], b.shapes[x])
    gate = b.node("Sigmoid", [b.conv(b.relu(b.conv(b.gap(x), 4, k=1, pad=0)), 12, k=1, pad=0)], (1, 12, 1, 1))
    x = b.node("Mul", [x, gate], b.shapes[x])  # squeeze-and-excitation
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    x = b.conv(b.node("Pad", [x, pads], (1, 12, 10, 10)), 16, pad=0)
    t = b.node("Transpose", [x], (1, 8, 8, 16), perm=[0, 2, 3, 1])
    t = b.node("Transpose", [b.relu(t)], (1, 16, 8, 8), perm=[0, 3, 1, 2])
    shape = b.const(np.array([-1, 16 * 8 * 8], np.int64), "shape")
    f = b.node("Reshape", [t, shape], (1, 16 * 8 * 8))
    return b.build(b.gemm(b.relu(b.gemm(f, 20)), 5))


def test_misc_ops_prune_exactly():
    model, dead = zero_channels(_misc_model(), 0.5)
    assert dead > 0
    out, recs = apply(model, "prune-channels{ratio=0.5}")
    assert recs[0].stats["channels_removed"] == dead
    split = next(n for n in out.graph.node if n.op_type == "Split")
    sizes = next(onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.name == split.input[1])
    assert list(sizes) == [4, 4]
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


def _shuffle_model() -> onnx.ModelProto:
    b = ModelBuilder("shuffle", (1, 3, 8, 8), batch=1)
    x = b.relu(b.conv("input", 8))
    s1 = b.const(np.array([1, 2, 4, 8, 8], np.int64), "s")
    x = b.node("Reshape", [x, s1], (1, 2, 4, 8, 8))
    x = b.node("Transpose", [x], (1, 4, 2, 8, 8), perm=[0, 2, 1, 3, 4])
    s2 = b.const(np.array([1, 8, 8, 8], np.int64), "s")
    x = b.node("Reshape", [x, s2], (1, 8, 8, 8))
    x = b.relu(b.conv(x, 8))
    y = b.node("LRN", [x], b.shapes[x], size=3)
    return b.build(b.gemm(b.flatten(b.gap(b.conv(y, 6))), 4))


def test_channel_shuffle_prunes_as_a_permutation_and_lrn_is_left_alone():
    model = _shuffle_model()
    g = _graph(model)
    an = channel_groups(g)
    shuffled = next(grp for grp in an.groups if an.roots[grp.roots[0]].origin == "conv3")
    # One unit is channel i of each shuffle group: deleting it keeps the permutation a shuffle.
    assert shuffled.prunable and {len(u[shuffled.roots[0]]) for u in shuffled.units} == {2}
    dead_model, dead = zero_channels(model, 0.5)
    out, recs = apply(dead_model, "prune-channels{ratio=0.5}")
    reasons = " | ".join(s.reason for s in recs[0].skipped)
    assert "LRN" in reasons
    # conv3 (through the shuffle: 2 units of 2) and the conv after the LRN; not the conv the LRN reads
    assert recs[0].stats["channels_removed"] == dead == 2 + 3
    shapes = [onnx.numpy_helper.to_array(i).tolist() for i in out.graph.initializer if i.name.startswith("s")]
    assert [1, 2, 2, 8, 8] in shapes and [1, 4, 8, 8] in shapes  # the shuffle's reshapes follow
    assert_same_outputs(dead_model, out, rtol=1e-5, atol=1e-5)


def test_pipeline_fold_then_prune_on_example(example_model):
    from graphslim.core.ir import load_model

    model = load_model(example_model)
    out, recs = apply(model, "fold-batchnorm,eliminate-identity,prune-channels{ratio=0.5}", verify=True)
    assert "BatchNormalization" not in op_types(out)
    assert _n_params(out) < 0.6 * _n_params(model)
    assert recs[-1].verification["top1_agreement"] is not None


def test_slice_on_space_keeps_channels_and_slice_on_channels_freezes():
    def model(axis: int) -> onnx.ModelProto:
        b = ModelBuilder("slice", (1, 3, 8, 8))
        x = b.relu(b.conv("input", 8))
        starts, ends, axes = (b.const(np.array(v, np.int64), "s") for v in ([1], [7], [axis]))
        shape = list(b.shapes[x])
        shape[axis] = 6
        x = b.node("Slice", [x, starts, ends, axes], tuple(shape))
        return b.build(b.gemm(b.flatten(b.gap(b.conv(x, 6))), 4))

    spatial, dead = zero_channels(model(2), 0.5)
    out, recs = apply(spatial, "prune-channels{ratio=0.5}")
    assert recs[0].stats["channels_removed"] == dead and dead == 4 + 3  # both convs' groups pruned
    assert_same_outputs(spatial, out, rtol=1e-5, atol=1e-5)
    out, recs = apply(model(1), "prune-channels{ratio=0.5}")
    assert any("cuts the channel axis" in s.reason for s in recs[0].skipped)
    assert recs[0].stats["channels_removed"] == 3  # only the conv after the slice


@pytest.mark.parametrize("arch", sorted(ZOO_STYLE))
def test_zoo_style_graphs_prune_at_least_30_percent(arch):
    """DenseNet and Inception v2 whose BatchNorm is a Mul/Add by Unsqueezed initializers (the
    constant subexpressions are folded first), ShuffleNet v1 (grouped 1x1 + channel shuffle) and v2
    (split, concat, shuffle): the fold-batchnorm,prune-channels pipeline removes >= 30%."""
    model = ZOO_STYLE[arch]()
    out, recs = apply(model, "fold-batchnorm,prune-channels{ratio=0.5}", verify=True)
    assert _n_params(out) <= 0.7 * _n_params(model)
    assert recs[-1].verification["runs"] is True
    assert not [s for s in recs[-1].skipped if "reaches graph output" not in s.reason]  # nothing else left alone


def test_grouped_conv_reading_a_concat_prunes_where_groups_line_up():
    """A grouped Conv reading Concat(a, c): with 2 groups each group reads one conv; with 3 groups
    over 8 + 10 channels the middle group reads the end of a and the start of c. Either way the
    convs prune in one group whose parts keep equal counts, and dead channels go exactly."""

    def model(groups: int) -> onnx.ModelProto:
        b = ModelBuilder("gconcat", (1, 3, 8, 8))
        x = b.relu(b.conv("input", 12))
        a, c = b.relu(b.conv(x, 8)), b.relu(b.conv(x, 8 if groups == 2 else 10))
        y = b.relu(b.conv(b.concat([a, c]), 12 if groups == 2 else 18, group=groups))
        return b.build(b.gemm(b.flatten(b.gap(y)), 4))

    for groups in (2, 3):
        an = channel_groups(_graph(model(groups)))
        cat = [grp for grp in an.groups if len(grp.roots) == 2]
        assert len(cat) == 1 and cat[0].prunable and cat[0].slices == groups
        dead_model, dead = zero_channels(model(groups), 0.5)
        out, recs = apply(dead_model, "prune-channels{ratio=0.5}")
        assert recs[0].stats["channels_removed"] == dead > 0
        assert_same_outputs(dead_model, out, rtol=1e-5, atol=1e-5)


def _channels_of(model: onnx.ModelProto) -> dict[str, int]:
    return {
        n.name: [i for i in model.graph.initializer if i.name == n.input[1]][0].dims[0]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm")
    }


def test_layer_ratios_set_single_groups_and_name_a_group_by_any_producer(example_model):
    model = onnx.load(str(example_model))
    before = _channels_of(apply(model, "fold-batchnorm")[0])
    # conv3 and conv2 share one group (residual Add): naming either one prunes it.
    out, recs = apply(
        model, 'fold-batchnorm,prune-channels{ratio=0.0,layer_ratios=["conv3=0.5","fc1=0.25","nope=0.3"]}'
    )
    after = _channels_of(out)
    assert after["conv2"] == after["conv3"] == before["conv3"] // 2
    assert after["fc1"] == before["fc1"] - before["fc1"] // 4
    assert after["conv1"] == before["conv1"]  # not named: ratio=0.0
    assert any(s.where == "nope" and "names no prunable group" in s.reason for s in recs[-1].skipped)
    # Groups not named take `ratio`.
    out2, _ = apply(model, 'fold-batchnorm,prune-channels{ratio=0.5,layer_ratios=["fc1=0.0"]}')
    after2 = _channels_of(out2)
    assert after2["fc1"] == before["fc1"] and after2["conv1"] == before["conv1"] // 2


def test_layer_ratios_options_are_checked():
    from graphslim.core.errors import PipelineError
    from graphslim.pipeline import Pipeline

    p = Pipeline.parse('prune-channels{ratio=0.0,layer_ratios=["a/b.c=0.25"]}')
    assert Pipeline.parse(str(p)) == p
    for bad in ('["conv1"]', '["conv1=1.0"]', '["conv1=0.2","conv1=0.3"]', '["conv1=x"]'):
        with pytest.raises(PipelineError, match="layer_ratios"):
            Pipeline.parse(f"prune-channels{{layer_ratios={bad}}}")
    with pytest.raises(PipelineError, match="scope=local"):
        Pipeline.parse('prune-channels{scope=global,layer_ratios=["conv1=0.2"]}')
    model = ARCHITECTURES["resnet"]()
    g = _graph(model)
    an = channel_groups(g)
    two = next(grp for grp in an.groups if grp.prunable and len(grp.roots) > 1)
    a, b = (an.roots[r].origin for r in two.roots[:2])
    with pytest.raises(Exception, match="different ratios"):
        apply(model, f'prune-channels{{layer_ratios=["{a}=0.25","{b}=0.5"]}}')
