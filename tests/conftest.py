from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import run, sample_inputs  # noqa: E402

from graphslim.ir import Graph  # noqa: E402
from graphslim.passmanager import PassContext, PassManager, PassRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits"
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def apply(model: onnx.ModelProto, pipeline: str, **ctx: object) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run ``pipeline`` on a copy of ``model``; the result must pass the full checker."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = Graph.from_model(onnx.shape_inference.infer_shapes(copy))
    graph.infer_shapes()
    records = PassManager(pipeline).run(graph, PassContext(**ctx))
    out = graph.to_model()
    onnx.checker.check_model(out, full_check=True)
    return out, records


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = 1e-4, atol: float = 1e-5,
                        feeds: dict[str, np.ndarray] | None = None) -> None:
    feeds = feeds or sample_inputs(a)
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * max(1.0, float(np.abs(x).max())))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture
def example_model() -> Path:
    return EXAMPLE / "model.onnx"


@pytest.fixture
def example_data() -> Path:
    return EXAMPLE / "data.npz"
