"""How good a model's outputs are: one module for the formulas every pass, budget and report uses.

One question, one answer: given a model's inputs, its outputs, optional labels and an optional
attention mask, :func:`choose_metric` picks the metric for the judged output (the first output
unless told otherwise) and :func:`score_outputs` returns one number plus the details:

==================  ===========================================================================
``accuracy``        (N, classes) logits with integer labels: top-1 accuracy.
``agreement``       logits without labels: fraction of samples whose argmax equals the
                    reference's. For token logits [B, S, V] (an output named ``*logits*``), the
                    fraction of tokens, counting only tokens the attention mask keeps.
``pooled_cosine``   hidden states [B, S, H] when an attention-mask input [B, S] exists: the
                    cosine between mask-weighted means over S of output and reference, averaged
                    over samples (how sentence embeddings are judged).
``cosine``          any other float output: cosine between output and reference per sample
                    (each sample's values flattened), averaged over samples.
``mse``             available on request: reported as ``1 - MSE / mean(reference^2)`` so that, as
                    for every metric here, higher is better and the reference scores 1.
==================  ===========================================================================

Every metric is higher-is-better; fidelity metrics give the reference 1.0, accuracy gives it its
own accuracy. A *drop in points* is ``100 * (reference value - value)``: points of top-1 accuracy
with labels, otherwise points of the model's metric (1 point of pooled cosine is 0.01).

:class:`Evaluator` binds a reference model to a data set (reference outputs computed once) and
scores candidates, models or their outputs, against it. :func:`compare_outputs` is the worst-case
deviation over all outputs that ``--verify`` records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphslim.core.data import Dataset, check_labels
from graphslim.core.errors import InputError
from graphslim.core.runtime import run_model

__all__ = [
    "METRICS",
    "Evaluator",
    "Fidelity",
    "MetricSpec",
    "Score",
    "accuracy",
    "choose_metric",
    "compare_outputs",
    "find_mask_input",
    "input_array",
    "input_names",
    "masked_mean",
    "nonfinite_outputs",
    "score_outputs",
]

log = logging.getLogger(__name__)

#: Metric names a user may request; ``auto`` chooses by the rules in the module docstring.
METRICS = ("auto", "accuracy", "agreement", "pooled_cosine", "cosine", "mse")

# Rank-2 outputs whose name says "embedding" are judged by cosine, not by argmax agreement.
_EMBEDDING_WORDS = ("embed", "pool", "hidden", "feature", "vector", "encod", "sentence")


@dataclass(frozen=True)
class MetricSpec:
    """Which metric judges which output, and the attention-mask input used for it (if any)."""

    name: str  # one of METRICS except auto
    output: int = 0  # index of the judged output
    output_name: str = ""
    mask_input: str | None = None

    def describe(self) -> str:
        what = {
            "accuracy": "top-1 accuracy",
            "agreement": "top-1 agreement with the reference",
            "pooled_cosine": "cosine of mask-weighted mean-pooled outputs to the reference",
            "cosine": "cosine to the reference (per sample)",
            "mse": "1 - MSE / mean(reference^2)",
        }[self.name]
        mask = f", mask {self.mask_input}" if self.mask_input and self.name != "accuracy" else ""
        return f"{what} ({self.output_name or f'output {self.output}'}{mask})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output": self.output_name,
            "mask_input": self.mask_input,
            "description": self.describe(),
        }


@dataclass
class Score:
    """One number (higher is better) and how it was reached."""

    metric: str
    value: float
    details: dict[str, Any] = field(default_factory=dict)


def find_mask_input(inputs: Mapping[str, Any] | Sequence[str]) -> str | None:
    """The attention-mask input among ``inputs`` (names, or a name -> array mapping): named
    ``attention_mask``, else the only input whose name contains ``mask``."""
    names = list(inputs)
    if "attention_mask" in names:
        return "attention_mask"
    masks = [n for n in names if "mask" in n.lower()]
    return masks[0] if len(masks) == 1 else None


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _mask_for(out: np.ndarray, inputs: Mapping[str, np.ndarray] | None, mask_input: str | None) -> np.ndarray | None:
    if not mask_input or inputs is None or mask_input not in inputs:
        return None
    m = np.asarray(inputs[mask_input])
    if m.ndim == 2 and out.ndim >= 2 and m.shape == out.shape[:2]:
        return m.astype(np.float64)
    return None


def choose_metric(
    outputs: Sequence[np.ndarray],
    *,
    output_names: Sequence[str] = (),
    input_names: Sequence[str] = (),
    labels: np.ndarray | None = None,
    requested: str = "auto",
    output: int = 0,
) -> MetricSpec:
    """The metric for output ``output`` (see the module docstring); ``requested`` overrides the
    choice, and a request the output cannot support (accuracy without labels, agreement on a
    float output that is not logits...) is an :class:`InputError`."""
    if requested not in METRICS:
        raise InputError(f"unknown metric {requested!r}; choose one of {', '.join(METRICS)}")
    if not 0 <= output < len(outputs):
        raise InputError(f"the model has {len(outputs)} output(s), no output {output}")
    out = np.asarray(outputs[output])
    name = output_names[output] if output < len(output_names) else ""
    mask_input = find_mask_input(list(input_names))
    logits2d = out.ndim == 2 and out.shape[1] > 1 and _is_float(out)
    token_logits = out.ndim == 3 and "logit" in name.lower() and _is_float(out)
    embedding_name = any(w in name.lower() for w in _EMBEDDING_WORDS)
    has_labels = labels is not None and logits2d and len(labels) == len(out)
    if requested == "auto":
        if has_labels:
            chosen = "accuracy"
        elif not _is_float(out):
            chosen = "agreement"
        elif (logits2d and not embedding_name) or token_logits:
            chosen = "agreement"
        elif out.ndim == 3 and mask_input is not None:
            chosen = "pooled_cosine"
        else:
            chosen = "cosine"
    else:
        chosen = requested
        if chosen == "accuracy" and not has_labels:
            raise InputError("metric accuracy needs integer labels and (N, classes) logits as the judged output")
        if chosen == "pooled_cosine" and (out.ndim != 3 or mask_input is None):
            raise InputError("metric pooled_cosine needs a [B, S, H] output and an attention-mask input")
        if chosen in ("cosine", "mse") and not _is_float(out):
            raise InputError(f"metric {chosen} needs a float output")
    return MetricSpec(chosen, output, name, mask_input)


def masked_mean(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean over axis 1 of [B, S, ...], weighted by ``mask`` [B, S] where given."""
    x = np.asarray(x, dtype=np.float64)
    if mask is None:
        return x.mean(axis=1)
    w = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    return (x * w).sum(1) / np.maximum(w.sum(1), 1e-12)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return np.clip(cos, -1.0, 1.0)


def score_outputs(
    spec: MetricSpec,
    new: Sequence[np.ndarray],
    ref: Sequence[np.ndarray] | None = None,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
) -> Score:
    """Score outputs ``new`` by ``spec`` against reference outputs ``ref`` (and ``labels`` for
    accuracy). ``inputs`` supplies the attention mask."""
    b = np.asarray(new[spec.output])
    if spec.name == "accuracy":
        if labels is None:
            raise InputError("accuracy needs labels")
        value = float(np.mean(np.argmax(b, axis=1) == labels))
        details: dict[str, Any] = {"accuracy": value}
        if ref is not None:
            details["top1_agreement"] = float(np.mean(np.argmax(b, 1) == np.argmax(np.asarray(ref[spec.output]), 1)))
        return Score("accuracy", value, details)
    if ref is None:
        raise InputError(f"metric {spec.name} compares with a reference model's outputs")
    a = np.asarray(ref[spec.output])
    if a.shape != b.shape:
        raise InputError(f"output {spec.output_name or spec.output} changed shape: {a.shape} -> {b.shape}")
    mask = _mask_for(a, inputs, spec.mask_input)
    if spec.name == "agreement":
        if not _is_float(a):
            eq = (a == b).reshape(len(a), -1).all(axis=1)
            value = float(np.mean(eq))
        elif a.ndim == 3:
            eq = np.argmax(a, -1) == np.argmax(b, -1)
            value = float(np.sum(eq * mask) / max(mask.sum(), 1e-12)) if mask is not None else float(np.mean(eq))
        else:
            value = float(np.mean(np.argmax(a, 1) == np.argmax(b, 1)))
        return Score("agreement", value, {"top1_agreement": value})
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    details = {"max_abs_diff": float(np.max(np.abs(a64 - b64))) if a64.size else 0.0}
    if a64.ndim == 0:
        a64, b64 = a64.reshape(1, 1), b64.reshape(1, 1)
    elif a64.ndim == 1:
        a64, b64 = a64[None], b64[None]
    if spec.name == "pooled_cosine" and a64.ndim >= 3:
        cos = _row_cosines(masked_mean(a64, mask), masked_mean(b64, mask))
        value = float(np.mean(cos))
        details.update({"pooled_cosine": value, "min_sample_cosine": float(np.min(cos))})
        return Score("pooled_cosine", value, details)
    if spec.name == "mse":
        w = None if mask is None or a64.ndim < 3 else mask.reshape(mask.shape + (1,) * (a64.ndim - 2))
        err = (a64 - b64) ** 2
        mse = (
            float(np.sum(err * w) / max(np.sum(w) * np.prod(a64.shape[2:]), 1e-12))
            if w is not None
            else float(err.mean())
        )
        power = float(np.mean(a64**2)) or 1.0
        details.update({"mse": mse, "nmse": mse / power})
        return Score("mse", 1.0 - mse / power, details)
    cos = _row_cosines(a64, b64)
    value = float(np.mean(cos))
    details.update({"cosine": value, "min_sample_cosine": float(np.min(cos))})
    return Score("cosine", value, details)


def input_array(data: Dataset | Any, name: str) -> np.ndarray | None:
    """One input of a data set as one array (for a sharded data set, read batch by batch in
    order: only that input is kept), or None when the data set has no such input."""
    if hasattr(data, "inputs"):
        return data.inputs.get(name)
    parts = [b.inputs[name] for b in data.batches(4096) if name in b.inputs]
    return np.concatenate(parts) if parts else None


def input_names(data: Dataset | Any) -> list[str]:
    if hasattr(data, "inputs"):
        return list(data.inputs)
    return list(next(iter(data.batches(1))).inputs)


class Evaluator:
    """A reference model and a data set: the reference outputs are computed once, then models
    (or their outputs) are scored against them with the metric chosen for this model.

    ``reference_value`` is the reference's own score (1.0 for fidelity metrics, its accuracy for
    ``accuracy``); :meth:`drop_points` is ``100 * (reference_value - value)``.
    """

    def __init__(
        self,
        reference: onnx.ModelProto | Any,
        data: Dataset,
        *,
        metric: str = "auto",
        output: int = 0,
        reference_outputs: list[np.ndarray] | None = None,
    ):
        self.data = data
        self.ref = reference_outputs if reference_outputs is not None else run_model(reference, data)
        names_out, names_in = _io_names(reference)
        self.spec = choose_metric(
            self.ref,
            output_names=names_out,
            input_names=input_names(data) or names_in,
            labels=data.labels,
            requested=metric,
            output=output,
        )
        mask = input_array(data, self.spec.mask_input) if self.spec.mask_input else None
        self._inputs = {self.spec.mask_input: mask} if mask is not None else {}
        self.reference_value = self.score_outputs(self.ref).value

    def take(self, n: int) -> Evaluator:
        """The same evaluator on the first ``n`` samples (reference outputs sliced, not rerun)."""
        if n >= len(self.data):
            return self
        new = object.__new__(Evaluator)
        new.data = self.data.take(n)
        new.ref = [r[:n] if np.ndim(r) and len(r) == len(self.data) else r for r in self.ref]
        new.spec = self.spec
        new._inputs = {k: v[:n] for k, v in self._inputs.items()}
        new.reference_value = new.score_outputs(new.ref).value
        return new

    def score_outputs(self, outputs: Sequence[np.ndarray]) -> Score:
        return score_outputs(self.spec, outputs, self.ref, inputs=self._inputs, labels=self.data.labels)

    def score(self, model: onnx.ModelProto | Any) -> Score:
        return self.score_outputs(run_model(model, self.data))

    def drop_points(self, score: Score | float) -> float:
        value = score.value if isinstance(score, Score) else float(score)
        return 100.0 * (self.reference_value - value)


def _io_names(model: onnx.ModelProto | Any) -> tuple[list[str], list[str]]:
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        return [o.name for o in model.graph.output], [i.name for i in model.graph.input if i.name not in inits]
    if hasattr(model, "get_outputs"):
        return [o.name for o in model.get_outputs()], [i.name for i in model.get_inputs()]
    return [], []


# --------------------------------------------------------------------------- worst-case deviation


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
    """Worst case over all outputs: max abs and relative difference, cosine of the flattened
    outputs, top-1 agreement of (N, classes) outputs."""
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
    """Top-1 accuracy of output ``output_index`` against ``data.labels`` (None without labels or
    without (N, classes) logits). Labels outside the output's class range are refused
    (:class:`InputError`)."""
    if data.labels is None:
        return None
    outs = run_model(model, data)
    if outs[output_index].ndim != 2:
        return None
    check_labels("labels", np.asarray(data.labels), int(outs[output_index].shape[1]))
    return score_outputs(MetricSpec("accuracy", output_index), outs, labels=data.labels).value
