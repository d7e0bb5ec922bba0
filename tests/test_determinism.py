"""Same input + same pipeline + same seed -> byte-identical model, for every built-in pass."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import apply
from models import ARCHITECTURES, run, sample_inputs

from graphslim.core.data import Dataset
from graphslim.core.ir import model_bytes

PIPELINES = [
    "fold-constants,eliminate-identity,fold-batchnorm,fuse-matmul-add,eliminate-dead-nodes",
    "prune-channels{ratio=0.5}",
    "prune-channels{ratio=0.3,criterion=random,scope=global}",
    "prune-channels{target_macs=0.5}",
    "factorize-svd{rank_ratio=0.25}",
    "sparsify-blocks{sparsity=0.8,block=[4,4]}",
    "quantize-int8",
    "quantize-binary",
]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pass_output_is_byte_identical_across_runs(pipeline):
    model = ARCHITECTURES["resnet"]()
    feeds = sample_inputs(model, 32)
    data = Dataset(feeds, np.argmax(run(model, feeds)[0], 1))
    a, _ = apply(model, pipeline, data=data, seed=3)
    b, _ = apply(model, pipeline, data=data, seed=3)
    assert model_bytes(a) == model_bytes(b)
