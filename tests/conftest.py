from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import run, sample_inputs  # noqa: E402

from graphslim.core.ir import Graph  # noqa: E402
from graphslim.pipeline import PassContext, PassManager, PassRecord  # noqa: E402

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


def assert_same_outputs(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
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


_RUN_ON_ARM = """
import sys
sys.path.insert(0, sys.argv[4])
import numpy as np
import tvm
from tvm import relax
vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
out = vm["main"](tvm.runtime.tensor(np.load(sys.argv[2])))
np.save(sys.argv[3], out.numpy() if hasattr(out, "numpy") else out[0].numpy())
"""


def run_aarch64(library: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """Run an AArch64 ``model.so`` on ``x`` under qemu-user-static, with the aarch64 Python and TVM
    runtime that ``.ci/aarch64-sysroot.sh`` builds (``GRAPHSLIM_AARCH64_SYSROOT``); skips the
    calling test when those tools are missing. qemu emulates every AArch64 extension (NEON, dot
    product), so the code runs whatever the board would have."""
    import os
    import shutil
    import subprocess

    sysroot = os.environ.get("GRAPHSLIM_AARCH64_SYSROOT")
    qemu = shutil.which("qemu-aarch64-static")
    if not sysroot or not qemu or not Path(sysroot, "root/usr/bin/python3.11").exists():
        pytest.skip("needs qemu-user-static and GRAPHSLIM_AARCH64_SYSROOT (.ci/aarch64-sysroot.sh)")
    if Path(library).suffix != ".so":
        pytest.skip("needs gcc-aarch64-linux-gnu to link the ARM library")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(_RUN_ON_ARM)
    r = subprocess.run(
        [
            qemu,
            "-L",
            f"{sysroot}/root",
            f"{sysroot}/root/usr/bin/python3.11",
            str(tmp_path / "run.py"),
            str(library),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
            f"{sysroot}/site",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(tmp_path / "y.npy")
