"""Running models in ONNX Runtime and comparing their outputs (verification, accuracy, fidelity)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim.data import Dataset
from graphslim.ir import is_large, model_bytes, save_model

__all__ = ["Fidelity", "accuracy", "compare_outputs", "ort_session", "run_model"]

log = logging.getLogger(__name__)


def ort_session(model: onnx.ModelProto | bytes, *, optimize: bool = False, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session. Graph optimizations are off by default so that the numbers
    compared are the model's own, not those of ORT's fused rewrites."""
    from graphslim.runtime import require_onnxruntime

    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
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


def run_model(model: onnx.ModelProto | Any, data: Dataset, *, batch_size: int = 256) -> list[np.ndarray]:
    """All outputs of ``model`` on ``data``, batched, concatenated along the first axis."""
    sess = model if hasattr(model, "run") else ort_session(model)
    chunks: list[list[np.ndarray]] = []
    for batch in data.batches(batch_size):
        chunks.append(sess.run(None, batch.inputs))
    if len(chunks) == 1:
        return chunks[0]
    return [np.concatenate([c[i] for c in chunks]) if np.ndim(chunks[0][i]) else chunks[0][i]
            for i in range(len(chunks[0]))]


@dataclass
class Fidelity:
    """How far outputs moved: worst case over all outputs."""

    max_abs_diff: float
    max_rel_diff: float  # max |a - b| / max |a|, per output
    cosine: float  # min over outputs of the cosine similarity of the flattened outputs
    top1_agreement: float | None  # for (N, classes) outputs, fraction of samples with equal argmax
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "cosine": self.cosine,
                "top1_agreement": self.top1_agreement, **self.extra}


def compare_outputs(ref: list[np.ndarray], new: list[np.ndarray]) -> Fidelity:
    if len(ref) != len(new):
        raise ValueError(f"output count changed: {len(ref)} -> {len(new)}")
    max_abs, max_rel, cos_min = 0.0, 0.0, 1.0
    agree: list[float] = []
    for a, b in zip(ref, new, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"output shape changed: {a.shape} -> {b.shape}")
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if a64.size == 0:
            continue
        d = float(np.max(np.abs(a64 - b64)))
        scale = float(np.max(np.abs(a64)))
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
        na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
        cos = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        cos_min = min(cos_min, cos)
        if a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating):
            agree.append(float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))))
    return Fidelity(max_abs, max_rel, cos_min, min(agree) if agree else None)


def accuracy(model: onnx.ModelProto | Any, data: Dataset, output_index: int = 0) -> float | None:
    """Top-1 accuracy of output ``output_index`` against ``data.labels`` (None without labels)."""
    if data.labels is None:
        return None
    out = run_model(model, data)[output_index]
    if out.ndim != 2:
        return None
    return float(np.mean(np.argmax(out, axis=1) == data.labels))
