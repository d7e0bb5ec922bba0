"""quantize-int8: int8 weights (and activations) with the right form per op, calibration, and an
accuracy budget measured with the model's own metric.

Per op, whatever else ``op_types`` lists (see :mod:`graphslim.transforms.quantization`):
MatMul and Gemm get signed int8 weights and int8 compute; Conv gets signed int8 weights (int8
compute in static mode, float compute in dynamic mode, where ONNX Runtime's ConvInteger takes
only uint8 weights); Gather (embedding tables) is weight-only: an int8 table with one scale per
column. Weights are symmetric; ``per_channel=auto`` gives a layer one scale per output channel
where that cuts its weight quantization error at least 4x (outlier channels) and one scale per
tensor otherwise, which is ONNX Runtime's ``quantize_dynamic`` layout: same bytes, same fused
kernels.

``mode=dynamic`` (no data needed) quantizes activations at run time: per tensor
(``DynamicQuantizeLinear`` + ``MatMulInteger``, which ONNX Runtime fuses into
``DynamicQuantizeMatMul``), or per token (a scale and zero point per row: more accurate on
activations with outlier tokens, slower); ``activations=auto`` uses per token only for layers
where the sensitivity scan shows it helps. ``mode=static`` calibrates activation ranges on the
data (``calibration`` minmax, entropy or percentile; ``calibration_samples`` samples, batched to
whatever batch size the model takes, with a progress bar) once, and writes QDQ through
onnxruntime.quantization's QDQ quantizer with those ranges.

With data, the budget: the model's metric (:mod:`graphslim.core.metrics`: accuracy with labels,
agreement for logits, mask-pooled cosine for hidden states, cosine otherwise) on a fixed subset
of ``sensitivity_samples`` samples (0: 32 for continuous metrics, 256 for accuracy and agreement,
down to 4 where the model is large: see ``scan_samples``). If quantizing every layer costs more than ``max_drop``
points, each layer's cost alone is measured (one session with a switch per layer, see
``Probe``), and the most sensitive layers stay in float, worst first, until the budget is met.
The report lists every layer with its weight and activation form and the layers kept in float
with their cost.

Refuses: static mode without data (an error that says so), ``activations=per_token`` in static
mode, and layers in ``exclude``; says why for every weight layer it leaves alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from graphslim.core.errors import InputError
from graphslim.core.fs import scratch_dir
from graphslim.core.ir import Graph, model_bytes
from graphslim.core.metrics import Evaluator
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass
from graphslim.transforms.quantization import (
    CalibrationReader,
    Layer,
    Probe,
    choose_granularity,
    entropy_range,
    find_layers,
    quantize_dynamic_matmul,
    quantize_gather,
    quantize_weight_only,
    scan_samples,
    sensitivity_subset,
)

log = logging.getLogger(__name__)

_MAX_FIXUPS = 3  # real-model checks after the probe's choice, at most


@register_pass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    exact = False

    @dataclass(frozen=True)
    class Options:
        mode: Literal["static", "dynamic"] = "static"
        calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
        percentile: float = 99.99
        per_channel: Literal["auto", "true", "false"] | bool = "auto"
        activations: Literal["auto", "per_tensor", "per_token"] = "auto"
        reduce_range: bool = False
        exclude: tuple[str, ...] = ()
        op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Gather")
        max_drop: float = 0.5
        calibration_samples: int = 256
        sensitivity: bool = True
        sensitivity_samples: int = 0  # 0: 32 (cosine...) or 256 (accuracy...), fewer for big models
        symmetric_weights: bool = True  # weights are always symmetric int8; kept for old pipelines

        def __post_init__(self) -> None:
            if not 0.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (0, 100]")
            if self.max_drop < 0:
                raise ValueError("max_drop must be >= 0")
            if self.calibration_samples < 1:
                raise ValueError("calibration_samples must be >= 1")
            if self.sensitivity_samples < 0:
                raise ValueError("sensitivity_samples must be >= 0")
            if str(self.per_channel).lower() not in ("auto", "true", "false"):
                raise ValueError("per_channel is auto, true or false")
            bad = set(self.op_types) - {"Conv", "Gemm", "MatMul", "Gather"}
            if bad:
                raise ValueError(f"op_types can be Conv, Gemm, MatMul, Gather (not {', '.join(sorted(bad))})")
            if self.mode == "static" and self.activations == "per_token":
                raise ValueError(
                    "activations=per_token needs mode=dynamic (static activations are calibrated per tensor)"
                )
            if not self.symmetric_weights:
                raise ValueError("symmetric_weights=false is not supported: int8 weights are symmetric")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.mode == "static" and ctx.data is None:
            raise InputError("quantize-int8{mode=static} calibrates on a data set: give --data, or use mode=dynamic")
        layers, left = find_layers(graph, o.op_types, o.exclude)
        skipped = [Skip(n, r) for n, r in left]
        if not layers:
            why = "no layer to quantize (no MatMul, Gemm, Conv or Gather with a float constant weight in op_types)"
            return PassResult(changed=False, stats={"quantized": 0, "candidates": 0}, skipped=skipped, not_run=why)
        t0 = time.perf_counter()
        per_channel = {lay.name: choose_granularity(graph, lay, str(o.per_channel).lower(), o.mode) for lay in layers}
        stats: dict[str, Any] = {
            "mode": o.mode,
            "calibration": o.calibration if o.mode == "static" else None,
            "candidates": len(layers),
        }
        with scratch_dir("q") as tmp:
            work = _Work(graph, layers, per_channel, o, ctx, tmp)
            if o.mode == "static":
                work.calibrate()
                stats["calibration_samples"] = work.calibrated
                stats["seconds_calibration"] = round(time.perf_counter() - t0, 3)
            plan = work.default_plan()
            keep_float: list[str] = []
            quantized = work.build(plan)
            if ctx.data is not None and o.sensitivity:
                plan, quantized, keep_float = _meet_budget(work, plan, quantized, stats, skipped, o)
        for name in keep_float:
            cost = work.costs.get(name)
            what = f"quantizing it alone costs {cost:.3f} points" if cost is not None else "the budget needed it"
            skipped.append(
                Skip(name, f"kept in float: {what} of {stats.get('metric', 'the metric')} (max_drop={o.max_drop})")
            )
        names_in = [t.name for t in graph.inputs]
        if [t.name for t in quantized.inputs] != names_in:
            raise RuntimeError("quantization changed the model's inputs")
        graph.assign(quantized)
        by = {lay.name: lay for lay in layers}
        stats["kept_float"] = keep_float
        stats["quantized"] = len(plan)
        stats["layers"] = [_describe(by[n], v, per_channel[n], o) for n, v in plan.items()]
        stats["per_token"] = [n for n, v in plan.items() if v == "token"]
        stats["quantize_nodes"] = sum(
            1 for n in quantized.nodes if n.op in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
        )
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return PassResult(changed=bool(plan), stats=stats, skipped=skipped)


def _meet_budget(
    work: _Work,
    plan: dict[str, str],
    quantized: Graph,
    stats: dict[str, Any],
    skipped: list[Skip],
    o: QuantizeInt8.Options,
) -> tuple[dict[str, str], Graph, list[str]]:
    """Keep the most sensitive layers in float until the real int8 model's drop is within
    ``max_drop`` (or say in ``skipped`` that it cannot be). Returns (plan, model, layers kept float)."""
    keep_float: list[str] = []
    # The real int8 model first: when it meets the budget, no scan is needed.
    ts = time.perf_counter()
    work.evaluator = work.make_evaluator(stats)
    drop = work.real_drop(quantized)
    stats["all_layers_drop_points"] = round(drop, 4)
    if drop > o.max_drop:
        plan, keep_float = work.choose(plan, stats)
        quantized = work.build(plan)
        drop = work.real_drop(quantized)
    fixups = 0
    while drop > o.max_drop and fixups < _MAX_FIXUPS and len(keep_float) < len(work.order):
        keep_float.append(work.order[len(keep_float)])
        plan = {k: v for k, v in plan.items() if k not in keep_float}
        quantized = work.build(plan)
        drop = work.real_drop(quantized)
        fixups += 1
    stats["final_drop_points"] = round(drop, 4)
    stats["seconds_sensitivity"] = round(time.perf_counter() - ts, 3)
    if drop > o.max_drop:
        skipped.append(
            Skip(
                "model",
                f"the budget cannot be met: {drop:.2f} points of {work.evaluator.spec.name} lost "
                f"with {len(keep_float)} layers in float",
            )
        )
    return plan, quantized, keep_float


def _fewest_in_float(
    order: list[str], plan: dict[str, str], drop: Callable[[dict[str, str]], float], max_drop: float
) -> int:
    """Smallest k such that keeping the first k layers of ``order`` in float brings ``drop`` of
    the rest of ``plan`` within ``max_drop`` (binary search)."""
    lo, hi = 0, len(order)
    cache = {0: drop(plan)}
    while lo < hi:
        mid = (lo + hi) // 2
        if mid not in cache:
            cache[mid] = drop({n: plan[n] for n in order[mid:]})
        if cache[mid] <= max_drop:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _describe(layer: Layer, variant: str, per_channel: bool, o: QuantizeInt8.Options) -> dict[str, Any]:
    weights = "int8 " + ("per-channel" if per_channel else "per-tensor") + (" (7-bit)" if o.reduce_range else "")
    acts = {
        "weight": "float (weight-only int8)",
        "tensor": "uint8, dynamic per tensor",
        "token": "uint8, dynamic per token",
        "static": f"uint8, static per tensor ({o.calibration})",
    }[variant]
    return {"name": layer.name, "op": layer.op, "weights": weights, "activations": acts}


class _Work:
    """One quantization job: calibration (once), the probe, the plan, the real model."""

    def __init__(
        self,
        graph: Graph,
        layers: list[Layer],
        per_channel: dict[str, bool],
        o: QuantizeInt8.Options,
        ctx: PassContext,
        tmp: Path,
    ):
        self.graph, self.layers, self.per_channel, self.o, self.ctx, self.tmp = graph, layers, per_channel, o, ctx, tmp
        self.by_name = {lay.name: lay for lay in layers}
        self.ranges: Any = None  # onnxruntime.quantization TensorsData (static)
        self.calibrated = 0
        self.evaluator: Evaluator | None = None
        self.costs: dict[str, float] = {}
        self.order: list[str] = []
        self._float_path: Path | None = None

    # ---- calibration
    def _float_model_path(self) -> Path:
        if self._float_path is None:
            self._float_path = self.tmp / "float.onnx"
            self._float_path.write_bytes(model_bytes(self.graph.to_model()))
        return self._float_path

    def calibrate(self) -> None:
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator
        from tqdm import tqdm

        o = self.o
        data = self.ctx.data.take(o.calibration_samples)
        self.calibrated = len(data)
        method, extra = {
            # ORT's entropy defaults (128 bins, 128 quantized bins) leave one candidate threshold,
            # the full range: entropy would equal minmax. 2048 bins give it a choice.
            "minmax": (CalibrationMethod.MinMax, {"symmetric": False}),
            "entropy": (CalibrationMethod.Entropy, {"symmetric": False, "num_bins": 2048, "num_quantized_bins": 128}),
            "percentile": (
                CalibrationMethod.Percentile,
                {"symmetric": False, "num_bins": 2048, "percentile": o.percentile},
            ),
        }[o.calibration]
        ops = sorted({lay.op for lay in self.layers if lay.op != "Gather"})
        model = self.graph.to_model()
        with tqdm(
            total=0,
            desc=f"quantize-int8 calibration ({o.calibration})",
            unit="batch",
            disable=not self.ctx.progress,
            leave=False,
        ) as bar:
            reader = CalibrationReader(data, model, on_batch=lambda: bar.update(1))
            bar.total = len(reader)
            with _quiet():
                calibrator = create_calibrator(
                    self._float_model_path(),
                    ops,
                    augmented_model_path=str(self.tmp / "augmented.onnx"),
                    calibrate_method=method,
                    extra_options=extra,
                )
                calibrator.collect_data(reader)
                if o.calibration == "entropy":
                    self.ranges = _entropy_ranges(calibrator)
                else:
                    self.ranges = calibrator.compute_data()
        del calibrator

    def static_range(self, name: str) -> tuple[float, float]:
        lo, hi = self.ranges[name].range_value
        return float(np.min(lo)), float(np.max(hi))

    # ---- plans
    def default_plan(self) -> dict[str, str]:
        o = self.o
        plan = {}
        for lay in self.layers:
            if lay.op == "Gather":
                plan[lay.name] = "weight"
            elif o.mode == "static":
                plan[lay.name] = "static"
            elif lay.op == "Conv":
                plan[lay.name] = "weight"
            else:
                plan[lay.name] = "token" if o.activations == "per_token" else "tensor"
        if o.mode == "static":
            missing = [n for n, v in plan.items() if v == "static" and self._input_name(n) not in self.ranges]
            for n in missing:  # a layer whose input the calibrator did not see: weight-only would be wrong too
                del plan[n]
        return plan

    def _input_name(self, layer: str) -> str:
        node = next(n for n in self.graph.nodes if n.name == layer)
        return node.inputs[0].name

    def variants(self, plan: dict[str, str]) -> dict[str, list[str]]:
        """The forms the scan tries per layer: per tensor and per token with activations=auto."""
        out = {n: [v] for n, v in plan.items()}
        if self.o.mode == "dynamic" and self.o.activations == "auto":
            for n, v in plan.items():
                if v == "tensor":
                    out[n] = ["tensor", "token"]
        return out

    def make_evaluator(self, stats: dict[str, Any]) -> Evaluator:
        """The model's metric on a fixed subset, sized for the scan (see scan_samples)."""
        o = self.o
        subset = sensitivity_subset(self.ctx.data, o.calibration_samples if o.mode == "static" else 0)
        model = self.graph.to_model()
        # The metric decides the subset's size: choose it on two samples, then run the reference once.
        spec = Evaluator(model, subset.take(2), metric=self.ctx.metric).spec
        switches = sum(len(v) for v in self.variants(self.default_plan()).values())
        subset = subset.take(scan_samples(self.graph, subset, spec.name, switches, o.sensitivity_samples))
        ev = Evaluator(model, subset, metric=self.ctx.metric)
        stats.update(
            {
                "metric": ev.spec.name,
                "metric_description": ev.spec.describe(),
                "sensitivity_samples": len(ev.data),
                "float": round(ev.reference_value, 6),
            }
        )
        return ev

    def choose(self, plan: dict[str, str], stats: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        """The scan: every layer's cost alone (in one probe session), then the fewest most
        sensitive layers kept in float for the plan to meet the budget."""
        from tqdm import tqdm

        o = self.o
        variants = self.variants(plan)
        ranges = {}
        if o.mode == "static":
            ranges = {
                self._input_name(n): self.static_range(self._input_name(n)) for n, v in plan.items() if v == "static"
            }
        probe = Probe(
            self.graph,
            [self.by_name[n] for n in plan],
            variants,
            per_channel=self.per_channel,
            ranges=ranges,
            reduce_range=o.reduce_range,
        ).build()
        ev = self.evaluator
        # Scored against the probe's own float outputs (switches off), so that the costs compare
        # fake quantization with float computed the same way.
        ref = Evaluator(
            self.graph.to_model(), ev.data, metric=self.ctx.metric, reference_outputs=probe.run(ev.data, {})
        )

        def drop(assign: dict[str, str]) -> float:
            return ref.drop_points(ref.score_outputs(probe.run(ev.data, assign)))

        scan = [(n, v) for n in plan for v in variants[n]]
        costs: dict[tuple[str, str], float] = {}
        for n, v in tqdm(
            scan, desc="quantize-int8 sensitivity", unit="layer", disable=not self.ctx.progress, leave=False
        ):
            costs[(n, v)] = drop({n: v})
        plan = dict(plan)
        for n, vs in variants.items():
            if "token" in vs:
                ct, ck = costs[(n, "tensor")], costs[(n, "token")]
                # Per token only where it clearly helps: it is slower than the fused per-tensor form.
                if ck < 0.5 * ct and ct > 0.05 * max(o.max_drop, 1e-3):
                    plan[n] = "token"
        self.costs = {n: costs[(n, plan[n])] for n in plan}
        stats["sensitivity_points"] = {n: round(c, 4) for n, c in self.costs.items()}
        if any(len(v) > 1 for v in variants.values()):
            stats["sensitivity_points_per_token"] = {
                n: round(costs[(n, "token")], 4) for n in plan if (n, "token") in costs
            }
        self.order = sorted(plan, key=lambda n: (-self.costs[n], n))
        # Smallest k such that keeping the k most sensitive layers in float meets the budget
        # (binary search: the drop falls, roughly monotonically, as layers return to float).
        keep = self.order[: _fewest_in_float(self.order, plan, drop, o.max_drop)]
        return {n: v for n, v in plan.items() if n not in keep}, keep

    # ---- the real model
    def build(self, plan: dict[str, str]) -> Graph:
        o = self.o
        g = self.graph.copy()
        static = [n for n, v in plan.items() if v == "static"]
        if static:
            g = self._static_qdq(static)
        by = {n.name: n for n in g.nodes}
        shared: dict = {}
        for name, variant in plan.items():
            lay, node = self.by_name[name], by.get(name)
            if node is None or variant == "static":
                continue
            if lay.op == "Gather":
                quantize_gather(g, node, per_channel=self.per_channel[name], reduce_range=o.reduce_range)
            elif variant == "weight":
                quantize_weight_only(g, node, lay, per_channel=self.per_channel[name], reduce_range=o.reduce_range)
            else:
                quantize_dynamic_matmul(
                    g,
                    node,
                    per_token=variant == "token",
                    per_channel=self.per_channel[name],
                    reduce_range=o.reduce_range,
                    shared=shared,
                )
        g.cleanup()
        g.toposort()
        return g

    def _static_qdq(self, nodes: list[str]) -> Graph:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

        ops = sorted({self.by_name[n].op for n in nodes})
        with _quiet():
            model = load_model_with_shape_infer(self._float_model_path())
            q = QDQQuantizer(
                model,
                any(self.per_channel[n] for n in nodes),
                self.o.reduce_range,
                QuantType.QInt8,
                QuantType.QUInt8,
                _with_softmax_ranges(self.ranges, model),
                nodes,
                [],
                ops,
                # Outputs are quantized too (ORT's default): ONNX Runtime then runs QLinearConv /
                # QLinearMatMul, and the TVM backend fuses the requantization into its int8 kernels.
                {"WeightSymmetric": True, "ActivationSymmetric": False},
            )
            out = q.quantize_model()
        out.ir_version = min(out.ir_version, self.graph.to_model().ir_version)
        del out.metadata_props[:]
        return Graph.from_model(_restore_meta(out, self.graph))

    def real_drop(self, g: Graph) -> float:
        ev = self.evaluator
        return ev.drop_points(ev.score(g.to_model()))


def _with_softmax_ranges(ranges: Any, model: onnx.ModelProto) -> Any:
    """``ranges`` with [0, 1] for every Softmax output it lacks. ONNX Runtime's quantizer sets the
    range of every Softmax output in the model to [0, 1] and fails on one the calibration did not
    cover (calibration covers only what the quantized op types read: with op_types=[Gemm] a
    transformer's attention Softmax is not among them)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    missing = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and n.output[0] not in ranges]
    if not missing:
        return ranges
    data = dict(ranges.items())
    data.update({m: TensorData(lowest=np.float32(0.0), highest=np.float32(1.0)) for m in missing})
    return TensorsData(ranges.calibration_method, data)


def _entropy_ranges(calibrator: Any) -> Any:
    """TensorsData from the calibrator's histograms with graphslim's vectorized entropy search."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData

    out = {}
    for name, (hist, edges, lowest, highest, _) in calibrator.collector.histogram_dict.items():
        lo, hi = entropy_range(hist, edges, lowest, highest, 128)
        out[name] = (np.array(lo, dtype=edges.dtype), np.array(hi, dtype=edges.dtype), hist, edges)
    return TensorsData(CalibrationMethod.Entropy, out)


def _restore_meta(model: onnx.ModelProto, like: Graph) -> onnx.ModelProto:
    src = like.to_model()
    model.producer_name, model.producer_version = src.producer_name, src.producer_version
    model.metadata_props.extend(src.metadata_props)
    return model


class _RootToModule(logging.Filter):
    """Moves what a library logs through the root logger below ERROR into this module's logger at
    INFO (shown with -v). The root logger's level is never changed: other threads and the user's
    own logging configuration are left as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.levelno < logging.ERROR:
            log.info("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


class _quiet:
    """onnxruntime.quantization logs advice at WARNING through the root logger and its
    calibrators print() progress to stdout (which ``--json`` owns): both go to this module's log
    at INFO (shown with -v)."""

    def __enter__(self) -> None:
        self.filter = _RootToModule()
        logging.getLogger().addFilter(self.filter)
        self.buf = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.buf)
        self.redirect.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.redirect.__exit__(*exc)
        logging.getLogger().removeFilter(self.filter)
        for line in self.buf.getvalue().splitlines():  # the calibrators' progress prints
            if line.strip():
                log.info("%s", line.strip())
