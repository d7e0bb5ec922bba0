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
import tempfile
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset
from graphslim.core.errors import GraphslimError
from graphslim.core.ir import is_large, model_bytes, save_model

__all__ = ["fixed_batch", "installed_flavors", "ort_session", "require_onnxruntime", "require_training", "run_model"]

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
        # Over 2 GB: ORT reads external data from files only. The folder lives as long as the session.
        tmp = tempfile.TemporaryDirectory(prefix="graphslim-ort-")
        save_model(model, Path(tmp.name) / "model.onnx")
        sess = ort.InferenceSession(str(Path(tmp.name) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        sess._graphslim_tmp = tmp
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
