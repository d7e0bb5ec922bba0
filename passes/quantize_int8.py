"""quantize-int8: int8 quantization in QDQ format, with calibration and accuracy-driven layer choice.

Static mode inserts QuantizeLinear/DequantizeLinear pairs (the QDQ format), so the model stays a
standard ONNX graph that ONNX Runtime runs with int8 kernels and that the TVM backend can map to
int8 kernels. Weights are stored as int8 initializers (per-channel and symmetric by default:
about 4x smaller), activations as uint8 with ranges calibrated on the data set (``--data``, its
first ``calibration_samples`` samples) by ``calibration`` = minmax, entropy or percentile.
Dynamic mode quantizes weights only and computes activation scales at run time (ONNX Runtime's
QOperator form: MatMulInteger / ConvInteger with DynamicQuantizeLinear; uint8 weights where Conv
layers are included, since ConvInteger has no int8-weight kernel); it needs no data.

The calibrators and the QDQ quantizer are onnxruntime.quantization's, used as a library rather
than rewritten. What graphslim adds is the choice of layers: with data, every candidate layer's
effect is measured when it alone is quantized (top-1 accuracy with labels, otherwise top-1
agreement with the float model), and the most sensitive layers are left in float, worst first,
until the whole model is within ``max_drop`` points. The report lists the layers kept in float
and why.

Refuses: static mode without data (an error that says so), and layers in ``exclude``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from graphslim.core.data import Dataset
from graphslim.core.errors import InputError
from graphslim.core.fs import scratch_dir
from graphslim.core.ir import Graph, model_bytes
from graphslim.core.runtime import require_onnxruntime
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass

log = logging.getLogger(__name__)

_EVAL_SAMPLES = 1000


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a Dataset."""

    def __init__(self, data: Dataset, batch: int):
        # ONNX Runtime returns a graph input that is also an output (the calibrators add the
        # inputs as outputs) as a view of the caller's array, without a reference to it, and its
        # histogram calibrators (entropy, percentile) read those views after the last batch. So
        # every batch stays alive as long as the reader: an exhausted list iterator drops its list,
        # which freed the arrays and made the histograms read freed memory (NaN, at random).
        self._batches = list(data.batches(batch))
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        return None if b is None else b.inputs

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


@register_pass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    exact = False

    @dataclass(frozen=True)
    class Options:
        mode: Literal["static", "dynamic"] = "static"
        calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
        percentile: float = 99.99
        per_channel: bool = True
        symmetric_weights: bool = True
        exclude: tuple[str, ...] = ()
        op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
        max_drop: float = 0.5
        calibration_samples: int = 256
        sensitivity: bool = True

        def __post_init__(self) -> None:
            if not 0.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (0, 100]")
            if self.max_drop < 0:
                raise ValueError("max_drop must be >= 0")
            if self.calibration_samples < 1:
                raise ValueError("calibration_samples must be >= 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        model = graph.to_model()
        if o.mode == "static" and ctx.data is None:
            raise InputError("quantize-int8{mode=static} calibrates on a data set: give --data, or use mode=dynamic")
        candidates = [
            n.name
            for n in graph.nodes
            if n.op in o.op_types
            and n.name not in o.exclude
            and len(n.inputs) > 1
            and graph.constant(n.inputs[1]) is not None
        ]
        skipped = [Skip(name, "excluded by the exclude option") for name in o.exclude]
        if not candidates:
            return PassResult(changed=False, stats={"quantized": 0}, skipped=skipped)
        with scratch_dir("q") as tmp:
            work = _Quantizer(model, ctx.data, o, tmp)
            quantized = work.quantize(exclude=list(o.exclude))
            stats: dict = {
                "mode": o.mode,
                "calibration": o.calibration if o.mode == "static" else None,
                "candidates": len(candidates),
            }
            keep_float: list[str] = []
            if ctx.data is not None and o.sensitivity:
                metric = "accuracy" if ctx.data.labels is not None else "top1_agreement"
                base = work.score(model)
                drop = 100 * (base - work.score(quantized))
                stats.update({"metric": metric, "float": round(base, 6), "all_layers_drop_points": round(drop, 4)})
                if drop > o.max_drop:
                    from tqdm import tqdm

                    sens = {
                        name: 100 * (base - work.score(work.quantize(only=[name])))
                        for name in tqdm(
                            candidates,
                            desc="quantize-int8 sensitivity",
                            unit="layer",
                            disable=not ctx.progress,
                            leave=False,
                        )
                    }
                    stats["sensitivity_points"] = {k: round(v, 4) for k, v in sens.items()}
                    for name in sorted(sens, key=lambda k: (-sens[k], k)):
                        keep_float.append(name)
                        quantized = work.quantize(exclude=list(o.exclude) + keep_float)
                        drop = 100 * (base - work.score(quantized))
                        if drop <= o.max_drop:
                            break
                    for name in keep_float:
                        skipped.append(
                            Skip(
                                name,
                                f"kept in float: quantizing it alone costs {sens[name]:.2f} points "
                                f"of {metric} (budget max_drop={o.max_drop})",
                            )
                        )
                    if drop > o.max_drop:
                        skipped.append(
                            Skip(
                                "model",
                                f"the budget cannot be met: {drop:.2f} points lost even with "
                                f"{len(keep_float)} layers in float",
                            )
                        )
                stats.update({"final_drop_points": round(drop, 4), "kept_float": keep_float})
        names_in = [t.name for t in model.graph.input]
        if [t.name for t in quantized.graph.input] != names_in:
            raise RuntimeError("onnxruntime.quantization changed the model's inputs")
        graph.replace_model(quantized)
        q_ops = sum(1 for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"))
        stats["quantized"] = len(candidates) - len(keep_float)
        stats["quantize_nodes"] = q_ops
        return PassResult(changed=True, stats=stats, skipped=skipped)


class _Quantizer:
    """Runs onnxruntime.quantization with one calibration (cached) for many layer choices."""

    def __init__(self, model: onnx.ModelProto, data: Dataset | None, o: QuantizeInt8.Options, tmp: Path):
        self.model, self.data, self.o, self.tmp = model, data, o, tmp
        # The quantizer takes a path: given a ModelProto it may rewrite it in place (external data).
        self.path = tmp / "float.onnx"
        self.path.write_bytes(model_bytes(model))
        self.cache = tmp / "calibration.json"
        self.n = 0
        self.eval = data.take(_EVAL_SAMPLES) if data is not None else None
        self._ref = None
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0] if model.graph.input else None
        self.batch = dim0.dim_value if dim0 is not None and dim0.HasField("dim_value") and dim0.dim_value > 0 else 32

    def quantize(self, *, exclude: list[str] | None = None, only: list[str] | None = None) -> onnx.ModelProto:
        require_onnxruntime()  # its calibration sessions log through ONNX Runtime's default logger
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        o = self.o
        self.n += 1
        out = self.tmp / f"q{self.n}.onnx"
        extra = {"WeightSymmetric": o.symmetric_weights, "ActivationSymmetric": False, "CalibPercentile": o.percentile}
        common = dict(
            op_types_to_quantize=list(o.op_types),
            per_channel=o.per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=only,
            nodes_to_exclude=exclude or None,
            extra_options=extra,
        )
        prev = logging.getLogger().level
        if not log.isEnabledFor(logging.INFO):  # shown with -v
            logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice at WARNING through root
        try:
            if o.mode == "dynamic":
                # ConvInteger exists in ONNX Runtime for uint8 weights only (1.19 has no int8 kernel).
                if "Conv" in o.op_types:
                    common["weight_type"] = QuantType.QUInt8
                quantize_dynamic(self.path, out, **common)
            else:
                method = {
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[o.calibration]
                reader = _Reader(self.data.take(o.calibration_samples), self.batch)
                if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
                    common["calibration_cache_path"] = self.cache  # calibrate once for all layer choices
                quantize_static(
                    self.path,
                    out,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    calibrate_method=method,
                    **common,
                )
        finally:
            logging.getLogger().setLevel(prev)
        return onnx.load(str(out))

    def score(self, model: onnx.ModelProto) -> float:
        """Top-1 accuracy on labels, else top-1 agreement with the float model."""
        from graphslim.core.metrics import compare_outputs
        from graphslim.core.runtime import run_model

        outs = run_model(model, self.eval)
        if self.eval.labels is not None and outs[0].ndim == 2:
            return float(np.mean(np.argmax(outs[0], 1) == self.eval.labels))
        if self._ref is None:
            self._ref = run_model(self.model, self.eval)
        fid = compare_outputs(self._ref, outs)
        return fid.top1_agreement if fid.top1_agreement is not None else fid.cosine
