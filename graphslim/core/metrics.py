"""How close a model's outputs are to a reference, and how accurate they are: one place for the
formulas every pass, budget and report uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset, check_labels
from graphslim.core.runtime import run_model

__all__ = ["Fidelity", "accuracy", "compare_outputs", "nonfinite_outputs"]

log = logging.getLogger(__name__)


@dataclass
class Fidelity:
    """How far outputs moved: worst case over all outputs.

    The distances are over the values finite in both; ``nonfinite`` counts the values where one
    side is NaN or Inf and the other is not the same NaN or Inf (a pass that turns outputs into
    NaN shows here, never as a distance of 0)."""

    max_abs_diff: float
    max_rel_diff: float  # max |a - b| / max |a|, per output
    cosine: float  # min over outputs of the cosine similarity of the flattened outputs
    top1_agreement: float | None  # for (N, classes) outputs, fraction of samples with equal argmax
    nonfinite: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
            "nonfinite": self.nonfinite,
            **self.extra,
        }


def nonfinite_outputs(outputs: list[np.ndarray]) -> list[tuple[int, int]]:
    """(output index, count) of the float outputs that hold NaN or Inf."""
    found = []
    for i, a in enumerate(outputs):
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                found.append((i, n))
    return found


def compare_outputs(ref: list[np.ndarray], new: list[np.ndarray]) -> Fidelity:
    if len(ref) != len(new):
        raise ValueError(f"output count changed: {len(ref)} -> {len(new)}")
    max_abs, max_rel, cos_min = 0.0, 0.0, 1.0
    nonfinite = 0
    agree: list[float] = []
    for a, b in zip(ref, new, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"output shape changed: {a.shape} -> {b.shape}")
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if a64.size == 0:
            continue
        fa, fb = np.isfinite(a64), np.isfinite(b64)
        both = fa & fb
        # Equal specials (the same Inf, NaN against NaN) are no change; anything else is.
        same_special = ~fa & ~fb & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
        differs = ~both & ~same_special
        nonfinite += int(np.count_nonzero(differs))
        a64, b64 = a64[both], b64[both]
        if a64.size:
            d = float(np.max(np.abs(a64 - b64)))
            scale = float(np.max(np.abs(a64)))
            max_abs = max(max_abs, d)
            max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
            na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
            cos = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
            cos_min = min(cos_min, cos)
        if a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating):
            rows_ok = ~differs.reshape(a.shape).any(axis=1)
            agree.append(float(np.mean((np.argmax(a, 1) == np.argmax(b, 1)) & rows_ok)))
    return Fidelity(max_abs, max_rel, cos_min, min(agree) if agree else None, nonfinite)


def accuracy(model: onnx.ModelProto | Any, data: Dataset, output_index: int = 0) -> float | None:
    """Top-1 accuracy of output ``output_index`` against ``data.labels`` (None without labels).
    Labels outside the output's class range are refused (:class:`InputError`)."""
    if data.labels is None:
        return None
    out = run_model(model, data)[output_index]
    if out.ndim != 2:
        return None
    check_labels("labels", np.asarray(data.labels), int(out.shape[1]))
    return float(np.mean(np.argmax(out, axis=1) == data.labels))
