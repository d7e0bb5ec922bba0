"""TVM (Relax) backend: compile an ONNX model for x86, ARM or CUDA, export it, load and run it.

ONNX -> Relax (``tvm.relax.frontend.onnx.from_onnx``) -> graphslim's Relax rewrites
(``graphslim.kernels.REWRITES``, where the compression-aware kernels plug in) -> the default Relax
pipeline for the target -> ``tvm.compile`` -> ``OUT_DIR/model.so`` (``model.tar`` for a cross
target without a linker) and ``OUT_DIR/artifact.json``.

Targets: ``x86`` is the host CPU as LLVM sees it (AVX-512 where the host has it, AVX2 on an AVX2
host such as this project's AMD EPYC machines, which lack AVX-512); ``x86-avx2`` and
``x86-avx512`` pin the ISA; ``arm`` / ``arm64-neon`` cross-compile for aarch64-linux-gnu with
NEON, linked by Debian's ``aarch64-linux-gnu-gcc`` when it is installed; ``cuda`` generates CUDA
with TVM's GPU schedules. Shapes are static: symbolic leading (batch) dimensions are fixed to
``batch``. apache-tvm is the optional extra ``tvm``.

Not here yet (issue 6): graphslim's own CPU schedules, MetaSchedule tuning, RPC measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim.errors import GraphslimError, InputError

__all__ = ["TARGETS", "Artifact", "build", "compile_model", "host_cpu_flags", "load_artifact", "require_tvm"]

log = logging.getLogger(__name__)

TARGETS = ("x86", "x86-avx2", "x86-avx512", "arm", "arm64-neon", "cuda")
ARM_CC = "aarch64-linux-gnu-gcc"
CUDA_ARCH = "sm_80"


def require_tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise InputError(f"compiling needs Apache TVM: pip install 'graphslim[tvm]' ({e})") from None
    return tvm


def host_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _target_spec(name: str) -> dict[str, Any]:
    tvm = require_tvm()
    cores = os.cpu_count() or 1
    if name == "x86":
        flags = host_cpu_flags()
        try:
            mcpu = tvm.target.codegen.llvm_get_system_cpu()
        except Exception:  # noqa: BLE001 - older builds: decide from the flags
            mcpu = "skylake-avx512" if "avx512f" in flags else "haswell" if "avx2" in flags else "x86-64"
        return {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}
    if name == "x86-avx2":
        return {"kind": "llvm", "mcpu": "haswell", "num-cores": cores}
    if name == "x86-avx512":
        return {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": cores}
    if name in ("arm", "arm64-neon"):
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if name == "cuda":
        return {"kind": "cuda", "arch": CUDA_ARCH}
    raise InputError(f"unknown target '{name}' (targets: {', '.join(TARGETS)})")


def _static_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose symbolic leading input dims are ``batch``; other symbolic dims are refused."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if i != 0:
                raise InputError(f"input '{vi.name}' has a symbolic dimension {i} ('{d.dim_param}'): only the "
                                 "batch dimension may be symbolic; give a model with static shapes")
            d.Clear()
            d.dim_value = batch
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(m)


@dataclass
class Artifact:
    folder: Path
    meta: dict[str, Any]


def compile_model(model: onnx.ModelProto, target: str, out_dir: Path, *, batch: int = 1,
                  model_sha256: str = "") -> Artifact:
    """Compile ``model`` for ``target`` into ``out_dir`` (replaced whole, atomically)."""
    from graphslim.optimize import write_output_dir

    export, meta = build(model, target, batch=batch, model_sha256=model_sha256)
    write_output_dir(Path(out_dir), {"model.so": export})
    return Artifact(Path(out_dir), meta)


def build(model: onnx.ModelProto, target: str, *, batch: int = 1, model_sha256: str = ""
          ) -> tuple[Any, dict[str, Any]]:
    """Compile; returns (a function that writes the library and artifact.json into a folder, meta)."""
    tvm = require_tvm()
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from graphslim import __version__
    from graphslim.kernels import REWRITES

    spec = _target_spec(target)
    static = _static_batch(model, batch)
    try:
        mod = from_onnx(static, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - the frontend raises many types for unsupported ops
        raise GraphslimError(f"TVM's ONNX frontend cannot import the model: {type(e).__name__}: {e}") from None
    mod = relax.transform.DecomposeOpsForInference()(mod)
    applied = []
    for name, rewrite in REWRITES.items():
        mod, changed = rewrite(mod, spec)
        if changed:
            applied.append(name)
    tgt = tvm.target.Target(spec)
    with tgt:
        ex = tvm.compile(mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt))
    inits = {i.name for i in static.graph.initializer}
    inputs = [{"name": vi.name, "shape": [d.dim_value for d in vi.type.tensor_type.shape.dim],
               "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))}
              for vi in static.graph.input if vi.name not in inits]
    options = {"target": target, "batch": batch}
    meta: dict[str, Any] = {
        "schema_version": 1, "target": target, "tvm_target": spec, "batch": batch, "inputs": inputs,
        "outputs": [o.name for o in static.graph.output], "rewrites": applied,
        "versions": {"graphslim": __version__, "tvm": tvm.__version__},
        "model_sha256": model_sha256,
        "options_sha256": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest(),
    }

    def export(folder: Path) -> None:
        if target in ("arm", "arm64-neon"):
            if shutil.which(ARM_CC):
                from tvm.support import cc

                ex.export_library(str(folder / "model.so"), fcompile=cc.cross_compiler(ARM_CC))
                meta["library"] = "model.so"
            else:
                ex.export_library(str(folder / "model.tar"))
                meta["library"] = "model.tar"
                meta["note"] = f"{ARM_CC} not found: object files in model.tar, link them on the target"
        else:
            ex.export_library(str(folder / "model.so"))
            meta["library"] = "model.so"
        if target == "cuda":
            # The library embeds CUDA C that is compiled when it loads (NVRTC or nvcc); keep a copy
            # to read and to check with nvcc on machines without a GPU.
            source = _cuda_source(ex.mod)
            if source:
                (folder / "model.cu").write_text(source)
                meta["cuda_source"] = "model.cu"
        (folder / "artifact.json").write_text(json.dumps(meta, indent=2) + "\n")

    return export, meta


def _cuda_source(mod: Any) -> str:
    """The CUDA C of the kernels in a compiled module tree ('' if none)."""
    found = []
    stack = [mod]
    while stack:
        m = stack.pop()
        if getattr(m, "kind", "") == "cuda":
            found.append(m.inspect_source(""))
        stack.extend(getattr(m, "imports", []))
    return "\n".join(found)


class _Runner:
    def __init__(self, folder: Path, meta: dict[str, Any]):
        tvm = require_tvm()
        from tvm import relax

        self.meta = meta
        lib = tvm.runtime.load_module(str(folder / meta["library"]))
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self._tvm = tvm

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(feeds[i["name"]], dtype=i["dtype"]))
                for i in self.meta["inputs"]]
        out = self.vm["main"](*args)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def load_artifact(folder: str | Path) -> _Runner:
    """Load an artifact compiled for this host; a clear error where it cannot run here."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "artifact.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: not a graphslim artifact ({e})") from None
    target = meta.get("target")
    if target in ("arm", "arm64-neon"):
        raise InputError(f"{folder}: compiled for aarch64; run it on an ARM device (or under qemu-aarch64)")
    if target == "cuda":
        raise InputError(f"{folder}: compiled for CUDA; no CUDA device is available here")
    mcpu = meta.get("tvm_target", {}).get("mcpu", "")
    if "avx512" in mcpu and "avx512f" not in host_cpu_flags():
        raise InputError(f"{folder}: compiled for {mcpu}, but this CPU has no AVX-512; compile with --target x86")
    return _Runner(folder, meta)
