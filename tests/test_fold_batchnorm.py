from __future__ import annotations

import numpy as np
import pytest
from conftest import apply, assert_same_outputs, op_types
from models import ARCHITECTURES, ModelBuilder


@pytest.mark.parametrize("arch", ["plain_cnn", "resnet", "densenet", "mobilenetv2", "grouped"])
def test_folds_every_batchnorm_exactly(arch):
    model = ARCHITECTURES[arch]()
    out, recs = apply(model, "fold-batchnorm")
    n_bn = op_types(model).count("BatchNormalization")
    assert n_bn > 0
    assert "BatchNormalization" not in op_types(out)
    assert recs[0].stats["batchnorm_folded"] == n_bn
    assert len(out.graph.node) == len(model.graph.node) - n_bn
    assert_same_outputs(model, out)


def test_gemm_and_conv_transpose_and_affine_chain():
    b = ModelBuilder("mixed", (1, 4, 8, 8))
    x = b.conv("input", 8)
    x = b.mul_const(x, np.linspace(0.5, 2.0, 8).reshape(8, 1, 1))  # per-channel Mul
    x = b.node("Add", [x, b.const(np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1), "k")], b.shapes[x])
    wt = b.const((b.rng.standard_normal((8, 3, 2, 2)) * 0.3).astype(np.float32))  # ConvTranspose, 1 group
    x = b.node("ConvTranspose", [x, wt], (1, 3, 16, 16), kernel_shape=[2, 2], strides=[2, 2])
    x = b.bn(x)
    x = b.gemm(b.flatten(b.maxpool(b.maxpool(x))), 6, trans_b=False)
    y = b.bn(x)
    model = b.build(y)
    out, recs = apply(model, "fold-batchnorm")
    assert op_types(out) == ["Conv", "ConvTranspose", "MaxPool", "MaxPool", "Flatten", "Gemm"]
    assert recs[0].stats == {"batchnorm_folded": 2, "affine_folded": 2, "batchnorm_left": 0, "constants_folded": 0}
    assert out.graph.output[0].name == model.graph.output[0].name  # graph output kept its name
    assert_same_outputs(model, out)


def test_refuses_shared_producer_and_reports_why():
    b = ModelBuilder("shared", (1, 3, 8, 8))
    c = b.conv("input", 4)
    y = b.bn(c)
    z = b.relu(c)  # the conv output has a second reader: folding would change it
    model = b.build(b.add(y, z))
    out, recs = apply(model, "fold-batchnorm")
    assert "BatchNormalization" in op_types(out)
    assert recs[0].changed is False
    assert recs[0].skipped and "other readers" in recs[0].skipped[0].reason
    assert_same_outputs(model, out)


def test_weight_shared_between_two_convs_is_not_corrupted():
    b = ModelBuilder("sharedw", (1, 3, 8, 8))
    c1 = b.conv("input", 4, bias=False)
    w = b.nodes[-1].input[1]
    c2 = b.node("Conv", ["input", w], b.shapes[c1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.build(b.add(b.bn(c1), c2))
    out, _ = apply(model, "fold-batchnorm")
    assert "BatchNormalization" not in op_types(out)
    assert_same_outputs(model, out)


def test_batchnorm_through_unsqueezed_initializers_folds():
    """Zoo exports write BatchNorm as Mul/Add by per-channel vectors that reach the Mul through an
    Unsqueeze of an initializer: a constant subexpression, folded first, then into the conv."""
    from models import inception_zoo

    model = inception_zoo()
    out, recs = apply(model, "fold-batchnorm")
    assert not {"Mul", "Add", "Unsqueeze"} & set(op_types(out))
    assert (
        recs[0].stats["constants_folded"] > 0 and recs[0].stats["affine_folded"] == 2 * 15
    )  # Mul and Add of 15 BatchNorms
    assert_same_outputs(model, out)
