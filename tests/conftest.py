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
import json, pathlib
lib = pathlib.Path(sys.argv[1])
meta = json.loads((lib.parent / "artifact.json").read_text())
weights = []
if "params" in meta:  # the weights beside the library (graphslim.kernels.params), after the inputs
    raw = np.fromfile(lib.parent / meta["params"]["file"], dtype=np.uint8)
    for t in meta["params"]["tensors"]:
        n = int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
        weights.append(np.ascontiguousarray(raw[t["offset"] : t["offset"] + n].view(t["dtype"]).reshape(t["shape"])))
vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
out = vm["main"](*[tvm.runtime.tensor(v) for v in [np.load(sys.argv[2]), *weights]])
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


# --------------------------------------------------------------------------- the canary tree


def _snapshot(root: Path, skip: list[Path]) -> dict[str, tuple]:
    """Everything below ``root`` as (type, mode, size, mtime, sha256 or link target); directory
    times are left out (they change when a permitted child does)."""
    import hashlib
    import os
    import stat

    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirs[:] = [d for d in sorted(dirs) if not any(_within(here / d, s) for s in skip)]
        for name in [*dirs, *sorted(files)]:
            p = here / name
            if any(_within(p, s) for s in skip):
                continue
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    st.st_size,
                    st.st_mtime_ns,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


def _within(p: Path, parent: Path) -> bool:
    return p == parent or parent in p.parents


class Canary:
    """A tree of the user's files around a test, which must come out of it unchanged except where
    the test allows (the output folder, the cache). ``put`` adds the test's inputs to the tree
    (they must stay unchanged too); ``allow`` names paths graphslim may create, change or delete;
    ``check`` compares now (the fixture also does at the end). TMPDIR points into the tree and
    must be empty again; the current folder is ``root / "work"``."""

    def __init__(self, root: Path):
        import os

        self.root = root
        self.tmpdir = root / "tmp"
        self.work = root / "work"
        for d in ("work", "work/sub", "docs", "docs/empty", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "work" / "notes.txt").write_text("the user's notes\n")
        (root / "work" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 16)
        (root / "docs" / "plan.md").write_text("# plan\n")
        os.chmod(root / "docs" / "plan.md", 0o640)
        os.chmod(root / "docs", 0o750)
        os.symlink("../docs/plan.md", root / "work" / "plan-link")
        os.symlink("../docs", root / "work" / "docs-link")
        self._allowed: list[Path] = []
        self._baseline = _snapshot(root, [])

    def put(self, rel: str, data: bytes | Path) -> Path:
        """An input file at ``root / rel`` (bytes, or a file to copy), part of what must not change."""
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.read_bytes() if isinstance(data, Path) else data)
        self._baseline = _snapshot(self.root, self._allowed)
        return p

    def allow(self, *paths: Path | str) -> None:
        for p in paths:
            self._allowed.append((self.root / p) if not Path(p).is_absolute() else Path(p))

    def rebase(self) -> None:
        """Take the current tree as the baseline (after a setup step that wrote into it)."""
        self._baseline = _snapshot(self.root, self._allowed)

    def check(self) -> None:
        now = _snapshot(self.root, self._allowed)
        base = {k: v for k, v in self._baseline.items() if not any(_within(self.root / k, a) for a in self._allowed)}
        created = sorted(set(now) - set(base))
        deleted = sorted(set(base) - set(now))
        changed = sorted(k for k in set(now) & set(base) if now[k] != base[k])
        assert not (created or deleted or changed), (
            f"outside the output and cache: created {created}, deleted {deleted}, changed {changed}"
        )
        leftovers = sorted(p.name for p in self.tmpdir.iterdir())
        assert not leftovers, f"left in TMPDIR: {leftovers}"


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A :class:`Canary` tree in ``tmp_path`` with TMPDIR and the current folder inside it."""
    import tempfile

    c = Canary(tmp_path / "canary")
    monkeypatch.setenv("TMPDIR", str(c.tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    monkeypatch.chdir(c.work)
    yield c
    c.check()
