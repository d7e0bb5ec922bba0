"""TVM (Relax) backend: compile an ONNX model for x86, ARM or CUDA, export it, load and run it.

ONNX -> Relax (``tvm.relax.frontend.onnx.from_onnx``) -> graphslim's Relax rewrites
(``graphslim.kernels.REWRITES``, where the compression-aware kernels plug in) -> the default Relax
pipeline for the target -> ``tvm.compile`` -> ``OUT_DIR/model.so`` (``model.tar`` for a cross
target without a linker) and ``OUT_DIR/artifact.json``.

Targets: ``x86`` is the host CPU as LLVM sees it (AVX-512 and VNNI on this project's Intel Emerald
Rapids machines, AVX2 only on the AMD EPYC machines it also runs on); ``x86-avx2``, ``x86-avx512``
and ``x86-avx512-vnni`` pin the ISA (an artifact that needs an instruction set the CPU lacks is
refused when loaded); ``arm`` / ``arm64-neon`` (and ``arm64-dot``, with the int8 dot product)
cross-compile for aarch64-linux-gnu with
NEON, linked by Debian's ``aarch64-linux-gnu-gcc`` when it is installed; ``cuda`` generates CUDA
with TVM's GPU schedules. Shapes are static: symbolic leading (batch) dimensions are fixed to
``batch``, other symbolic dimensions to the values ``shapes`` gives, before the model is
canonicalized and imported (:mod:`graphslim.kernels.prepare`). apache-tvm is the optional extra
``tvm``.

CPU targets compile through :func:`graphslim.kernels.pipeline.cpu_pipeline` (NHWC layout,
graphslim's default schedules, optional MetaSchedule tuning with a reusable database, local or
over a TVM RPC tracker); CUDA uses TVM's default pipeline with dlight GPU schedules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim.backend.threads import resolve_threads, use_threads
from graphslim.core.errors import GraphslimError, InputError

__all__ = [
    "TARGETS",
    "Artifact",
    "artifact_library",
    "artifact_meta",
    "build",
    "compile_model",
    "host_cpu_flags",
    "load_artifact",
    "require_tvm",
]

log = logging.getLogger(__name__)

TARGETS = ("x86", "x86-avx2", "x86-avx512", "x86-avx512-vnni", "arm", "arm64-neon", "arm64-dot", "cuda")
ARM_TARGETS = ("arm", "arm64-neon", "arm64-dot")
ARM_CC = "aarch64-linux-gnu-gcc"
CUDA_ARCH = "sm_80"
PARAMS_FILE = "params.bin"


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
    if name == "x86-avx512-vnni":  # AVX-512 with VNNI (int8 vpdpbusd): Cascade Lake and later
        return {"kind": "llvm", "mcpu": "cascadelake", "num-cores": cores}
    if name in ("arm", "arm64-neon"):
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if name == "arm64-dot":  # ARMv8.2 dot product (int8 sdot): Cortex-A55/A76 and later, Neoverse
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
    if name == "cuda":
        return {"kind": "cuda", "arch": CUDA_ARCH}
    raise InputError(f"unknown target '{name}' (targets: {', '.join(TARGETS)})")


def _static_batch(model: onnx.ModelProto, batch: int, shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy with static input shapes (see :func:`graphslim.kernels.prepare.fix_shapes`: symbolic
    leading dims are ``batch``, others come from ``shapes`` or are refused), shapes inferred."""
    from graphslim.kernels.prepare import fix_shapes

    return onnx.shape_inference.infer_shapes(fix_shapes(model, shapes, batch)[0])


@dataclass
class Artifact:
    folder: Path
    meta: dict[str, Any]


def compile_model(
    model: onnx.ModelProto,
    target: str,
    out_dir: Path,
    *,
    batch: int | None = None,
    shapes: dict[str, list[int]] | None = None,
    model_sha256: str = "",
    tune: int = 0,
    tuning_db: str | Path | None = None,
    rpc: tuple[str, str] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Artifact:
    """Compile ``model`` for ``target`` into ``out_dir`` (replaced whole, atomically). ``batch``
    and ``shapes`` fix the symbolic input dimensions as in :func:`build`.

    With ``tune`` trials, the tuning records end up in ``out_dir/tuning/`` (and in ``tuning_db``
    when given, which later builds reuse)."""
    from graphslim.core.fs import scratch_dir, write_output_dir

    with scratch_dir("tuning") as scratch:
        db = tuning_db if tuning_db is not None else (Path(scratch) if tune > 0 else None)
        export, meta = build(
            model,
            target,
            batch=batch,
            shapes=shapes,
            model_sha256=model_sha256,
            tune=tune,
            tuning_db=db,
            rpc=rpc,
            progress=progress,
            threads=threads,
        )
        if tuning_db is None and "tuning" in meta:
            meta["tuning"]["database"] = "tuning"  # the scratch folder is copied there
        write_output_dir(Path(out_dir), {"model.so": export}, kind="compile")
    return Artifact(Path(out_dir), meta)


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exact canonicalization passes (fold constants and BatchNorm, fuse MatMul+Add, drop
    identities and dead nodes), repeated to a fixed point, so TVM sees one conv+bias per layer
    (:func:`graphslim.kernels.prepare.canonicalize`). :func:`build` fixes the shapes first."""
    from graphslim.kernels.prepare import canonicalize as fixed_point

    return fixed_point(model)


def build(
    model: onnx.ModelProto,
    target: str,
    *,
    batch: int | None = None,
    shapes: dict[str, list[int]] | None = None,
    model_sha256: str = "",
    tune: int = 0,
    tuning_db: str | Path | None = None,
    rpc: tuple[str, str] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Compile; returns (a function that writes the library and artifact.json into a folder, meta).

    Shapes are static. ``shapes`` maps input names to whole shapes (``--shape input_ids=1x128``);
    a named symbolic dimension given in one input has that value in every input using the name;
    leading dimensions left symbolic are ``batch`` (default: as ``shapes`` gives them, else 1);
    any other symbolic dimension is an :class:`InputError` naming them. The shapes are fixed
    first, then the model is canonicalized to a fixed point (which folds the shape subgraphs
    that exports compute at run time), then imported (:mod:`graphslim.kernels.prepare`).

    ``tune`` > 0 runs MetaSchedule with that many trials in total over the model's kernels (CPU
    targets), keeping the records in ``tuning_db`` (a folder, created if missing); records
    already there are reused, so an unchanged model is not tuned again. ``rpc`` =
    (tracker "host:port", device key) measures on a remote device through a TVM RPC tracker
    (required to tune a cross-compiled target).

    ``threads`` is recorded in artifact.json as the thread count the artifact runs with (``run``
    and ``bench`` may override it; without it they use
    :func:`graphslim.backend.threads.default_threads`, which reads ``macs``, the model's
    multiply-adds per inference, also recorded) and is what tuning measures with."""
    tvm = require_tvm()
    from graphslim.core.version import __version__

    spec = _target_spec(target)
    _check_tuning(target, spec, tune, tuning_db, rpc)
    from graphslim.kernels.prepare import prepare

    static, batch = prepare(model, shapes, batch)
    macs = _model_macs(static)
    measure_threads = resolve_threads(threads, None, macs)[0]
    if tune > 0 and not rpc:
        use_threads(measure_threads)  # graphslim's default schedules are measured in this thread
    tuning_meta: dict[str, Any] = {}
    schedule_meta: dict[str, Any] = {}
    ex, applied, params = _compile(
        tvm,
        static,
        spec,
        tune=tune,
        tuning_db=tuning_db,
        rpc=rpc,
        progress=progress,
        measure_threads=measure_threads,
        tuning_meta=tuning_meta,
        schedule_meta=schedule_meta,
    )
    options = {
        "target": target,
        "batch": batch,
        "tune": tune,
        **({"shapes": shapes} if shapes else {}),
        **({"threads": threads} if threads is not None else {}),
    }
    meta: dict[str, Any] = {
        "schema_version": 1,
        "target": target,
        "tvm_target": spec,
        "batch": batch,
        "threads": threads,
        "macs": macs,
        "inputs": _input_specs(static),
        "outputs": [o.name for o in static.graph.output],
        "rewrites": applied,
        "schedules": schedule_meta.get("counts", {}) if spec["kind"] == "llvm" else "dlight GPU rules",
        **({"kernel_schedules": schedule_meta["kernels"]} if schedule_meta else {}),
        **({"tuning": tuning_meta} if tuning_meta else {}),
        "versions": {"graphslim": __version__, "tvm": tvm.__version__},
        "model_sha256": model_sha256,
        "options_sha256": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest(),
    }
    return _exporter(ex, meta, target, tuning_db, params), meta


def _check_tuning(
    target: str, spec: dict[str, Any], tune: int, tuning_db: str | Path | None, rpc: tuple[str, str] | None
) -> None:
    """Refuse (InputError, one line) tuning settings that cannot work for ``target``."""
    if tune > 0 and spec["kind"] != "llvm":
        raise InputError(f"--tune is supported for CPU targets; '{target}' compiles with TVM's default GPU schedules")
    if tune > 0 and spec.get("mtriple", "").startswith("aarch64") and rpc is None:
        raise InputError(f"tuning for '{target}' measures on the device: give --rpc-tracker HOST:PORT --rpc-key KEY")
    if tune > 0 and tuning_db is None:
        raise InputError("tuning needs a database folder (--tuning-db, or compile into an output folder)")
    if tune > 0 and rpc is not None:
        from graphslim.backend.remote import check_key

        check_key(rpc)  # an unreachable tracker or unknown key: one line now, not a tuning run of failures


def _compile(
    tvm: Any,
    static: onnx.ModelProto,
    spec: dict[str, Any],
    *,
    tune: int,
    tuning_db: str | Path | None,
    rpc: tuple[str, str] | None,
    progress: bool,
    measure_threads: int,
    tuning_meta: dict[str, Any],
    schedule_meta: dict[str, Any],
) -> tuple[Any, list[str], list[np.ndarray]]:
    """Import the static model into Relax and compile it: graphslim's CPU pipeline (schedules,
    tuning) on llvm targets, the rewrites and TVM's default pipeline elsewhere. Returns (the
    executable, the rewrites that changed the module, the weights lifted out of the library:
    ``main`` takes them after the inputs; llvm targets only, GPU libraries keep theirs); fills
    ``tuning_meta`` / ``schedule_meta``."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from graphslim.kernels import REWRITES

    try:
        mod = from_onnx(static, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - the frontend raises many types for unsupported ops
        raise GraphslimError(f"TVM's ONNX frontend cannot import the model: {type(e).__name__}: {e}") from None
    mod = relax.transform.DecomposeOpsForInference()(mod)
    applied: list[str] = []
    params: list[np.ndarray] = []
    tgt = tvm.target.Target(spec)
    with tgt:
        if spec["kind"] == "llvm":
            from graphslim.kernels.pipeline import cpu_pipeline

            mod = cpu_pipeline(
                tgt,
                tune=tune,
                tuning_db=tuning_db,
                tuning_report=tuning_meta,
                rpc=rpc,
                progress=progress,
                measure_threads=None if rpc else measure_threads,
                schedule_report=schedule_meta,
                rewrites=REWRITES,
                spec=spec,
                rewrites_applied=applied,
                lifted_params=params,
            )(mod)
            ex = tvm.compile(mod, tgt)
        else:
            for name, rewrite in REWRITES.items():
                mod, changed = rewrite(mod, spec)
                if changed:
                    applied.append(name)
            ex = tvm.compile(mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt))
    return ex, applied, params


def _input_specs(static: onnx.ModelProto) -> list[dict[str, Any]]:
    """artifact.json's ``inputs``: name, static shape and numpy dtype of each graph input."""
    inits = {i.name for i in static.graph.initializer}
    return [
        {
            "name": vi.name,
            "shape": [d.dim_value for d in vi.type.tensor_type.shape.dim],
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)),
        }
        for vi in static.graph.input
        if vi.name not in inits
    ]


def _exporter(
    ex: Any, meta: dict[str, Any], target: str, tuning_db: str | Path | None, params: list[np.ndarray]
) -> Callable[[Path], None]:
    """The function that writes the library, its side files and artifact.json into a folder
    (completing ``meta`` with what it wrote)."""

    def export(folder: Path) -> None:
        if params:
            from graphslim.kernels.params import pack

            data, tensors = pack(params)
            (folder / PARAMS_FILE).write_bytes(data)
            meta["params"] = {
                "file": PARAMS_FILE,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "tensors": tensors,
            }
        if target in ARM_TARGETS:
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
        # load_artifact loads only this file, and only while its hash matches.
        meta["library_sha256"] = hashlib.sha256((folder / meta["library"]).read_bytes()).hexdigest()
        if tuning_db is not None and Path(tuning_db).is_dir():
            shutil.copytree(tuning_db, folder / "tuning", ignore=shutil.ignore_patterns("logs", "*.log"))
            meta["tuning_records"] = "tuning"
        (folder / "artifact.json").write_text(json.dumps(meta, indent=2) + "\n")

    return export


def _model_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-adds of one inference of a static-shape model (graphslim's cost model), or None."""
    from graphslim.analysis.cost import cost_model
    from graphslim.core.ir import Graph

    try:
        return int(cost_model(Graph.from_model(model)).macs)
    except Exception as e:  # noqa: BLE001 - a cost the model cannot give only changes the thread default
        log.debug("no MAC count for the thread default: %s", e)
        return None


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


def _aligned(shape: list[int], dtype: str, align: int = 64) -> np.ndarray:
    """A zeroed array whose data is ``align``-byte aligned (TVM's DLPack import requires 64)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class _Runner:
    """Runs a loaded artifact. Inputs are copied into aligned buffers that TVM sees without a
    copy (made once), and outputs are read through DLPack: creating TVM tensors per call cost
    60 us here, as much as a small model's whole inference."""

    def __init__(
        self,
        folder: Path,
        meta: dict[str, Any],
        library: bytes,
        threads: int | None = None,
        params: list[np.ndarray] | None = None,
    ):
        params = params or []
        tvm = require_tvm()
        from tvm import relax

        from graphslim.core.fs import scratch_dir

        self.meta = meta
        self.threads, self.threads_from = resolve_threads(threads, meta.get("threads"), meta.get("macs"))
        # before anything in this thread runs a parallel kernel: the pool's first size is final
        use_threads(self.threads)
        # Loaded from a private copy of the bytes whose hash was checked, so the file cannot be
        # swapped between the check and the load; the mapping outlives the copy.
        with scratch_dir("artifact") as tmp:
            (tmp / meta["library"]).write_bytes(library)
            lib = tvm.runtime.load_module(str(tmp / meta["library"]))
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self._main = self.vm["main"]
        self._buffers = [_aligned(i["shape"], i["dtype"]) for i in meta["inputs"]]
        # the weights (when they are outside the library) follow the inputs: views of one
        # aligned buffer, which TVM uses in place
        self._tensors = [tvm.runtime.from_dlpack(b) for b in self._buffers + params]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for info, buf in zip(self.meta["inputs"], self._buffers, strict=True):
            value = np.asarray(feeds[info["name"]])
            if value.shape != buf.shape:
                raise InputError(
                    f"input '{info['name']}' has shape {list(value.shape)}; the artifact was compiled "
                    f"for {info['shape']}"
                )
            np.copyto(buf, value, casting="same_kind")
        use_threads(self.threads)  # per calling thread; a no-op when it is already set
        out = self._main(*self._tensors)
        outs = [out] if hasattr(out, "shape") else list(out)
        return [np.from_dlpack(o).copy() for o in outs]


def load_artifact(folder: str | Path, threads: int | None = None) -> _Runner:
    """Load an artifact compiled for this host; a clear error where it cannot run here. It runs
    on ``threads`` threads (default: the artifact's ``threads``, else
    :func:`graphslim.backend.threads.default_threads`), set through TVM's thread-pool API for
    each thread that calls it.

    Only the library named in ``artifact.json`` inside the artifact folder is loaded (a plain file
    name, no path), and only while its sha256 matches the one recorded when it was compiled: a
    truncated, changed or foreign library is refused, never executed. The same holds for the
    weights beside it (``params.bin``, :func:`artifact_params`), read once and used in place."""
    folder = Path(folder)
    meta = _artifact_meta(folder)
    target = meta["target"]
    if target in ARM_TARGETS:
        raise InputError(f"{folder}: compiled for aarch64; run it on an ARM device (or under qemu-aarch64)")
    if target == "cuda":
        raise InputError(f"{folder}: compiled for CUDA; no CUDA device is available here")
    try:
        missing = _missing_cpu_features(meta.get("tvm_target", {}))
    except Exception as e:  # noqa: BLE001 - TVM refuses a target it cannot parse with many types
        raise InputError(f"{folder}/artifact.json: bad field 'tvm_target' ({type(e).__name__})") from None
    if missing:
        mcpu = meta.get("tvm_target", {}).get("mcpu", "")
        raise InputError(
            f"{folder}: compiled for {mcpu}, but this CPU has no {', '.join(missing)}; "
            "compile with --target x86 on this machine"
        )
    if threads is not None and threads < 1:
        raise InputError("--threads must be >= 1")
    data = artifact_library(folder, meta)
    params = artifact_params(folder, meta)
    return _Runner(folder, meta, data, threads, params)


def artifact_meta(folder: str | Path) -> dict[str, Any]:
    """``artifact.json`` of a compiled folder with every field checked (no TVM needed): an
    :class:`InputError` naming a bad field, or a folder that is not an artifact."""
    return _artifact_meta(Path(folder))


def artifact_library(folder: str | Path, meta: dict[str, Any]) -> bytes:
    """The bytes of the artifact's library (the file ``meta`` names inside ``folder``), only while
    their sha256 is the one recorded at compile time; whoever loads or uploads a library loads
    or uploads these bytes, so the file cannot be swapped after the check."""
    folder = Path(folder)
    library = folder / meta["library"]
    if library.is_symlink() or not library.is_file():
        raise InputError(f"{folder}: the library '{meta['library']}' is missing or not a regular file")
    data = library.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["library_sha256"]:
        raise InputError(
            f"{folder}: '{meta['library']}' does not match the sha256 recorded when it was compiled "
            "(truncated or changed); compile it again"
        )
    return data


_MAX_ELEMENTS = 2**31


def _artifact_meta(folder: Path) -> dict[str, Any]:
    """artifact.json, with every field load_artifact and the CLI use checked."""
    path = folder / "artifact.json"
    try:
        if path.stat().st_size > 16 * 2**20:
            raise InputError(f"{folder}: artifact.json is too large to be graphslim's")
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: not a graphslim artifact ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{folder}: artifact.json is not a JSON object")

    def bad(key: str, why: str) -> InputError:
        return InputError(f"{folder}/artifact.json: bad field '{key}': {why}")

    if meta.get("target") not in TARGETS:
        raise bad("target", f"expected one of {', '.join(TARGETS)}")
    lib = meta.get("library")
    if not isinstance(lib, str) or not lib or lib != Path(lib).name or lib in (".", "..") or "\\" in lib:
        raise bad("library", "expected the file name of a library inside the artifact folder")
    digest = meta.get("library_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise bad("library_sha256", "missing or not a sha256 (compiled by an older graphslim? compile it again)")
    batch = meta.get("batch")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 2**20:
        raise bad("batch", "expected an integer from 1 to 1048576")
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 4096:
        raise bad("inputs", "expected a list of inputs")
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad("inputs", f"item {i} has no name")
        shape = item.get("shape")
        if (
            not isinstance(shape, list)
            or not shape
            or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape)
            or int(np.prod(shape, dtype=np.float64)) > _MAX_ELEMENTS
        ):
            raise bad("inputs", f"input {item['name'][:64]!r} has shape {str(shape)[:80]}")
        try:
            dtype = np.dtype(item.get("dtype"))
        except (TypeError, ValueError):
            dtype = np.dtype(object)
        if dtype.kind not in "fiub":
            raise bad("inputs", f"input {item['name'][:64]!r} has dtype {str(item.get('dtype'))[:40]!r}")
    if not isinstance(meta.get("outputs"), list) or not all(isinstance(o, str) for o in meta["outputs"]):
        raise bad("outputs", "expected a list of output names")
    if not isinstance(meta.get("tvm_target", {}), dict):
        raise bad("tvm_target", "expected an object")
    if "params" in meta:
        _check_params(meta["params"], bad)
    return meta


def _check_params(params: Any, bad: Callable[[str, str], InputError]) -> None:
    """artifact.json's ``params`` (the weights file beside the library): every tensor a known
    dtype and shape, aligned, and inside the file's recorded size."""
    from graphslim.kernels.params import ALIGN, LIFTED_DTYPES

    if not isinstance(params, dict) or params.get("file") != PARAMS_FILE:
        raise bad("params", f"expected an object naming '{PARAMS_FILE}'")
    digest, size, tensors = params.get("sha256"), params.get("bytes"), params.get("tensors")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise bad("params", "'sha256' is missing or not a sha256")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 2**40:
        raise bad("params", "'bytes' is not a size")
    if not isinstance(tensors, list) or len(tensors) > 2**20:
        raise bad("params", "'tensors' is not a list")
    for i, t in enumerate(tensors):
        shape, offset = (t.get("shape"), t.get("offset")) if isinstance(t, dict) else (None, None)
        ok = (
            isinstance(t, dict)
            and t.get("dtype") in LIFTED_DTYPES
            and isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offset, int)
            and not isinstance(offset, bool)
            and offset >= 0
            and offset % ALIGN == 0
        )
        if not ok or offset + int(np.prod(shape, dtype=np.float64)) * np.dtype(t["dtype"]).itemsize > size:
            raise bad("params", f"tensor {i} is not a dtype, shape and aligned offset inside the file")


def artifact_params(folder: str | Path, meta: dict[str, Any]) -> list[np.ndarray]:
    """The weights ``main`` takes after the inputs (an artifact compiled with them outside the
    library; none for one that embeds them), read once into one aligned buffer and returned as
    views of it, only while the file's sha256 is the one recorded at compile time."""
    if "params" not in meta:
        return []
    from graphslim.kernels.params import aligned_buffer, views

    folder = Path(folder)
    info = meta["params"]
    path = folder / info["file"]
    if path.is_symlink() or not path.is_file() or path.stat().st_size != info["bytes"]:
        raise InputError(f"{folder}: the weights file '{info['file']}' is missing, not a regular file or truncated")
    buffer = aligned_buffer(info["bytes"])
    with open(path, "rb") as f:
        if f.readinto(memoryview(buffer)) != info["bytes"]:
            raise InputError(f"{folder}: the weights file '{info['file']}' changed while it was read")
    if hashlib.sha256(buffer).hexdigest() != info["sha256"]:
        raise InputError(
            f"{folder}: '{info['file']}' does not match the sha256 recorded when it was compiled "
            "(truncated or changed); compile it again"
        )
    return views(buffer, info["tensors"])


#: LLVM feature -> /proc/cpuinfo flag, for the instruction sets graphslim's kernels use.
_CPU_FEATURES = {"avx2": "avx2", "avx512f": "avx512f", "avx512vnni": "avx512_vnni"}


def _missing_cpu_features(spec: dict[str, Any]) -> list[str]:
    """Instruction sets an x86 artifact's target has that this CPU lacks (running it would die
    with an illegal instruction)."""
    if spec.get("kind") != "llvm" or spec.get("mtriple", "").startswith("aarch64") or not spec.get("mcpu"):
        return []
    flags = host_cpu_flags()
    if not flags:
        return []  # no /proc/cpuinfo: cannot tell
    tvm = require_tvm()
    from tvm.target.codegen import target_has_features

    target = tvm.target.Target(spec)
    missing = []
    for feature, flag in _CPU_FEATURES.items():
        try:
            needed = bool(target_has_features(feature, target))
        except Exception:  # noqa: BLE001 - feature unknown to this LLVM
            needed = False
        if needed and flag not in flags:
            missing.append(flag.upper().replace("_", "-"))
    return missing
