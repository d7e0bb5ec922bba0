"""ONNX Runtime: which flavor is installed (clear errors when the needed one is not), sessions,
and running a model over a data set.

graphslim runs on either ``onnxruntime`` (extra ``ort``: the current inference build) or
``onnxruntime-training`` 1.19.2 (extra ``training``: inference plus the on-device training API the
``distill`` pass needs, with torch 2.13.0). Both distributions own the same ``onnxruntime/``
package directory, and pip does not notice when both are installed: whichever was installed last
wins, and removing either breaks the other. So they are mutually exclusive extras, and this
module names the problem when both are present.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from importlib import metadata
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset
from graphslim.core.errors import GraphslimError, InputError
from graphslim.core.fs import make_scratch_dir, remove_scratch
from graphslim.core.ir import is_large, model_bytes, save_model, strip_large_initializers
from graphslim.core.memory import available_bytes, format_bytes

__all__ = [
    "CONSTANT_TENSOR_LIMIT",
    "check_memory",
    "fixed_batch",
    "installed_flavors",
    "ort_session",
    "require_onnxruntime",
    "require_training",
    "run_model",
    "run_with_outputs",
]

log = logging.getLogger(__name__)

_FIX = (
    "pip uninstall -y onnxruntime onnxruntime-training && "
    "pip install 'graphslim[ort]' (or 'graphslim[training]' for distill)"
)


def installed_flavors() -> list[str]:
    found = []
    for dist in ("onnxruntime", "onnxruntime-training", "onnxruntime-gpu"):
        try:
            metadata.distribution(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def require_onnxruntime() -> ModuleType:
    """Import onnxruntime, or fail with the install command."""
    flavors = installed_flavors()
    if len(flavors) > 1:
        log.warning(
            "both %s are installed; they share one package directory and break each other. Fix: %s",
            " and ".join(flavors),
            _FIX,
        )
    try:
        import onnxruntime
    except ImportError as e:
        raise GraphslimError(
            f"ONNX Runtime is not installed or broken ({e}); install it with "
            "pip install 'graphslim[ort]' (or 'graphslim[training]')"
        ) from None
    # ONNX Runtime's own log writes to stderr: errors only (they surface as exceptions too),
    # its warnings with -v (when graphslim logs at INFO).
    onnxruntime.set_default_logger_severity(2 if logging.getLogger("graphslim").isEnabledFor(logging.INFO) else 3)
    return onnxruntime


def require_training() -> ModuleType:
    """Import onnxruntime.training (the distill pass needs it), or fail naming the extra."""
    ort = require_onnxruntime()
    # Before the training environment exists: its graph transformers log at INFO otherwise.
    ort.set_default_logger_severity(3)
    try:
        import onnxruntime.training.api  # noqa: F401 - imports torch as well
        from onnxruntime.training import artifacts, onnxblock  # noqa: F401
    except ImportError as e:
        hint = (
            f" Both onnxruntime and onnxruntime-training are installed and the inference build won. Fix: {_FIX}"
            if {"onnxruntime", "onnxruntime-training"} <= set(installed_flavors())
            else ""
        )
        raise GraphslimError(
            "the distill pass needs onnxruntime-training: pip install 'graphslim[training]' "
            f"(onnxruntime-training 1.19.2 and torch 2.13.0, in place of onnxruntime) [{e}].{hint}"
        ) from None
    import onnxruntime.training

    return onnxruntime.training


def ort_session(model: onnx.ModelProto | bytes, *, optimize: bool = False, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session. Graph optimizations are off by default so that the numbers
    compared are the model's own, not those of ORT's fused rewrites."""
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # failures surface as exceptions; native error logs would only be noise
    if threads:
        so.intra_op_num_threads = threads
    if not isinstance(model, bytes) and is_large(model):
        # Over 2 GB: ORT reads external data from files only. The folder lives as long as the
        # session (and no longer than the process: see graphslim.core.fs.make_scratch_dir).
        tmp = make_scratch_dir("ort")
        save_model(model, tmp / "model.onnx")
        sess = ort.InferenceSession(str(tmp / "model.onnx"), so, providers=["CPUExecutionProvider"])
        weakref.finalize(sess, remove_scratch, tmp)
        return sess
    data = model if isinstance(model, bytes) else model_bytes(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def fixed_batch(model: onnx.ModelProto | Any) -> int | None:
    """The batch size the model's inputs declare (a fixed first dimension), or None when the
    first dimension is symbolic."""
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        dims = []
        for vi in model.graph.input:
            if vi.name in inits or not vi.type.tensor_type.shape.dim:
                continue
            d = vi.type.tensor_type.shape.dim[0]
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    else:
        dims = [
            i.shape[0] if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 else None
            for i in model.get_inputs()
        ]
    fixed = {d for d in dims if d is not None}
    return fixed.pop() if len(fixed) == 1 else None


def run_model(model: onnx.ModelProto | Any, data: Dataset, *, batch_size: int = 256) -> list[np.ndarray]:
    """All outputs of ``model`` on ``data``, batched, concatenated along the first axis.

    A model whose inputs declare a fixed batch size runs in batches of exactly that size (the
    last one padded by repeating its final sample; the padding's outputs are dropped).
    """
    sess = model if hasattr(model, "run") else ort_session(model)
    fixed = fixed_batch(sess)
    size = fixed or batch_size
    chunks: list[list[np.ndarray]] = []
    for batch in data.batches(size):
        n = len(batch)
        feeds = batch.inputs
        if fixed is not None and n < fixed:
            pad = np.concatenate([np.arange(n), np.full(fixed - n, n - 1)])
            feeds = {k: v[pad] for k, v in feeds.items()}
        outs = sess.run(None, feeds)
        if fixed is not None and n < fixed:
            outs = [o[:n] if np.ndim(o) and len(o) == fixed else o for o in outs]
        chunks.append(outs)
    if len(chunks) == 1:
        return chunks[0]
    return [
        np.concatenate([c[i] for c in chunks]) if np.ndim(chunks[0][i]) else chunks[0][i] for i in range(len(chunks[0]))
    ]


#: A tensor computed from constants alone (no input) may be at most this large, or as large as all
#: of the model's weights together: more is a model that expands itself (a ConstantOfShape of
#: gigabytes feeding a ReduceSum), refused before it runs.
CONSTANT_TENSOR_LIMIT = 256 * 2**20


def check_memory(model: onnx.ModelProto, *, batch: int = 1, what: str = "the model") -> None:
    """Refuse (:class:`InputError`) a model that would run the machine out of memory, before
    ONNX Runtime runs it: a tensor computed from constants alone larger than
    :data:`CONSTANT_TENSOR_LIMIT` or the model's weights, or any tensor (first dimension =
    ``batch`` where symbolic) larger than the memory available. Sizes come from shape inference
    with data propagation, so shapes computed from constants count; unknown sizes pass."""
    light = strip_large_initializers(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - loading checked the model; this is a best effort
        return
    sizes: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        n = _nbytes(vi.type.tensor_type, batch)
        if n is not None:
            sizes[vi.name] = n
    weights, constant = 0, set()
    for init in model.graph.initializer:
        constant.add(init.name)
        try:
            weights += (
                int(np.prod(init.dims, dtype=np.float64))
                * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            )
        except (KeyError, TypeError, ValueError):
            pass
    limit = max(CONSTANT_TENSOR_LIMIT, weights)
    room = available_bytes()
    for node in model.graph.node:
        from_constants = all(not i or i in constant for i in node.input)
        for o in node.output:
            if from_constants:
                constant.add(o)
            size = sizes.get(o)
            if size is None:
                continue
            where = f"node '{node.name or o}' ({node.op_type})"
            if from_constants and size > limit:
                raise InputError(
                    f"{what}: {where} computes a {format_bytes(size)} tensor from constants, more than "
                    f"{format_bytes(limit)} (the model's weights, or {format_bytes(CONSTANT_TENSOR_LIMIT)}); refused"
                )
            if room is not None and size > room:
                raise InputError(
                    f"{what}: {where} makes a {format_bytes(size)} tensor at batch {batch}, more than the "
                    f"{format_bytes(room)} of memory available; refused"
                )


def _nbytes(tt: onnx.TypeProto.Tensor, batch: int) -> int | None:
    if not tt.elem_type or not tt.HasField("shape"):
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    n = 1
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:
            n *= d.dim_value
        elif i == 0:
            n *= batch
        else:
            return None
    return n * itemsize


def run_with_outputs(
    model: onnx.ModelProto, data: Dataset, names: list[str], *, batch: int = 8
) -> Iterator[dict[str, np.ndarray]]:
    """Intermediate tensors ``names`` of ``model`` on ``data``, one dict per batch (so a caller can
    reduce big activations batch by batch). The tensors become extra graph outputs of a copy."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = {vi.name: vi for vi in m.graph.value_info}
    present = {o.name for o in m.graph.output}
    for name in names:
        if name in present:
            continue
        vi = onnx.ValueInfoProto()
        if name in inferred:
            vi.CopyFrom(inferred[name])
            vi.type.tensor_type.ClearField("shape")
        else:
            vi.name = name
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        m.graph.output.append(vi)
    sess = ort_session(m)
    for b in data.batches(batch):
        yield dict(zip(names, sess.run(names, b.inputs), strict=True))
