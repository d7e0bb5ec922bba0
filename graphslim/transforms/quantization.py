"""Int8 building blocks: which layers quantize how, weight quantization, the dynamic-int8 rewrite,
calibration, and a probe model that measures any choice of quantized layers in one session.

Per op, independent of which other op types a pipeline lists:

=========  ==============================  =====================================================
op         weights                         activations
=========  ==============================  =====================================================
MatMul     int8, symmetric, per output     dynamic: uint8 at run time, per tensor
Gemm       column (axis N of [K, N])       (DynamicQuantizeLinear -> MatMulInteger, the form
                                           ONNX Runtime fuses into DynamicQuantizeMatMul) or per
                                           token (a scale and zero point per row); static:
                                           calibrated uint8 QDQ
Conv       int8, symmetric, per output     dynamic: float (weight-only: ONNX Runtime's
           channel                         ConvInteger takes only uint8 weights); static: QDQ
Gather     int8 table, one scale per       none: embeddings are weight-only
           column (hidden unit)
=========  ==============================  =====================================================

:class:`Probe` is the float model with, for every candidate layer, a switch (one element of an
extra input) that replaces its weight by the quantized weight and its input by the quantized
input, in float arithmetic (fake quantization, numerically what the int8 kernels compute). One
ONNX Runtime session then scores every layer alone, every subset, and every activation variant,
without writing a model per trial: the sensitivity scan of a model with L layers costs L runs on
a small fixed subset of the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from graphslim.core.data import Dataset
from graphslim.core.ir import Graph, Node, Tensor
from graphslim.core.runtime import fixed_batch, ort_session

__all__ = [
    "CalibrationReader",
    "Layer",
    "Probe",
    "dequantize",
    "entropy_range",
    "find_layers",
    "PER_CHANNEL_GAIN",
    "choose_granularity",
    "per_channel_gain",
    "quantize_dynamic_matmul",
    "quantize_gather",
    "quantize_symmetric",
    "quantize_weight_only",
    "scan_samples",
    "sensitivity_subset",
]

log = logging.getLogger(__name__)

PROBE_INPUT = "graphslim_probe"
DYNAMIC_OPS = ("MatMul", "Gemm")  # int8 compute with dynamic activation quantization
WEIGHT_ONLY_OPS = ("Conv", "Gather")  # int8 storage, float compute (in dynamic mode)


@dataclass(frozen=True)
class Layer:
    """A quantizable node: its name, op, which input holds the weight, and the weight's channel
    axis (the axis that keeps one scale per index)."""

    name: str
    op: str
    weight_index: int
    axis: int  # channel axis of the stored weight
    params: int

    @property
    def activation_index(self) -> int | None:
        """The input that is an activation (quantized along with the weight), if any."""
        return None if self.op == "Gather" else 0


def find_layers(
    graph: Graph, op_types: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Candidate layers and, for weight-carrying nodes left alone, (node name, reason)."""
    layers: list[Layer] = []
    skipped: list[tuple[str, str]] = []
    for n in graph.nodes:
        if n.op not in ("MatMul", "Gemm", "Conv", "Gather"):
            continue
        idx = 0 if n.op == "Gather" else 1
        if len(n.inputs) <= idx:
            continue
        w = graph.constant(n.inputs[idx])
        if w is None or w.dtype != np.float32:
            if n.op in ("MatMul", "Gemm") and graph.constant(n.inputs[0]) is not None:
                skipped.append((n.name, f"{n.op} with a constant left operand (only x @ W is quantized)"))
            continue  # activation x activation (attention) or index tables: not a weight layer
        if n.name in exclude:
            skipped.append((n.name, "excluded by the exclude option"))
            continue
        if n.op not in op_types:
            skipped.append((n.name, f"op type {n.op} is not in op_types"))
            continue
        reason, axis = _layer_axis(graph, n, w)
        if reason:
            skipped.append((n.name, reason))
            continue
        layers.append(Layer(n.name, n.op, idx, axis, int(w.size)))
    return layers, skipped


def _layer_axis(graph: Graph, n: Node, w: np.ndarray) -> tuple[str | None, int]:
    if n.op == "MatMul":
        return (None, 1) if w.ndim == 2 else (f"MatMul with a {w.ndim}-D weight (2-D only)", 0)
    if n.op == "Gemm":
        if n.attrs.get("transA", 0):
            return "Gemm with transA", 0
        return None, 0 if n.attrs.get("transB", 0) else 1
    if n.op == "Conv":
        return None, 0
    # Gather: an embedding table gathered along rows, one scale per column.
    if int(n.attrs.get("axis", 0)) != 0 or w.ndim != 2:
        return "Gather that is not a row lookup in a 2-D table", 0
    return None, 1


# --------------------------------------------------------------------------- weights

#: per_channel=auto gives a layer per-channel scales where they cut its weight's quantization
#: error (MSE) at least this much. Gaussian weights gain about 2.2x (not worth the extra scales,
#: 4/K of the weight bytes, and ONNX Runtime's per-tensor layout); a layer whose range is set by
#: a few outlier channels gains far more.
PER_CHANNEL_GAIN = 4.0


def quantize_symmetric(w: np.ndarray, axis: int | None, *, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales): ``w ~ q * scale``, symmetric, per index of ``axis`` (None:
    one scale). ``reduce_range`` uses 7 bits (+-63), which avoids the int16 saturation of
    AVX2's u8 x s8 multiply-add on some CPUs."""
    qmax = 63.0 if reduce_range else 127.0
    if axis is None:
        amax = np.asarray(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def per_channel_gain(w: np.ndarray, axis: int) -> float:
    """How many times smaller the weight's quantization MSE is per channel than per tensor."""
    errs = []
    for ax in (None, axis):
        q, s = quantize_symmetric(w, ax)
        errs.append(float(np.mean((dequantize(q, s, ax) - w) ** 2)))
    return errs[0] / errs[1] if errs[1] > 0 else (1.0 if errs[0] == 0 else float("inf"))


def choose_granularity(graph: Graph, layer: Layer, setting: str, mode: str) -> bool:
    """Per-channel (True) or per-tensor weights for ``layer``: ``setting`` true/false forces it;
    auto is per channel for static QDQ convolutions and matmuls (the usual QDQ form), and
    otherwise where :func:`per_channel_gain` reaches :data:`PER_CHANNEL_GAIN`."""
    if setting in ("true", "false"):
        return setting == "true"
    if mode == "static" and layer.op != "Gather":
        return True
    node = next(n for n in graph.nodes if n.name == layer.name)
    return per_channel_gain(graph.constant(node.inputs[layer.weight_index]), layer.axis) >= PER_CHANNEL_GAIN


def sensitivity_subset(data: Dataset, skip: int, n: int = 256) -> Dataset:
    """Up to ``n`` samples for sensitivity scans, after the first ``skip`` (the calibration
    samples) where the data set is large enough, else its first ``n``."""
    total = len(data)
    if total - skip >= min(n, 32):
        return data.slice(skip, min(total, skip + n))
    return data.take(n)


#: Multiply-accumulates a sensitivity scan may spend (about a minute on 2 cores).
SCAN_MACS = 1e12
MIN_SCAN_SAMPLES = 4
CONTINUOUS_METRICS = ("cosine", "pooled_cosine", "mse")


def scan_samples(graph: Graph, data: Dataset, metric: str, switches: int, requested: int = 0) -> int:
    """How many samples a sensitivity scan of ``switches`` trials uses: ``requested`` if given,
    else 32 for continuous metrics and 256 for accuracy/agreement, fewer (down to 4) where the
    model's cost times the trials would exceed :data:`SCAN_MACS`. The cost is the cost model's
    MACs per sample, or, where shapes are symbolic (a sequence length), the parameters times the
    data's sequence length: an estimate, but one that depends on nothing but the inputs, so the
    choice (and the model written) is the same on every machine."""
    if requested:
        return requested
    from graphslim.analysis.cost import cost_model

    default = 32 if metric in CONTINUOUS_METRICS else 256
    c = cost_model(graph)
    macs = c.macs
    if not macs:
        lengths = [v.shape[1] for v in data.inputs.values() if v.ndim == 2 and v.dtype.kind in "iu"]
        macs = c.params * max(lengths, default=1)
    fit = int(SCAN_MACS // max(macs * max(switches, 1), 1))
    return max(MIN_SCAN_SAMPLES, min(default, fit))


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * q.ndim
    if axis is not None and scale.ndim:
        shape[axis] = -1
    return (q.astype(np.float32) * scale.reshape(shape if scale.ndim else ())).astype(np.float32)


# --------------------------------------------------------------------------- rewrites


def _var(graph: Graph, hint: str, dtype: Any = np.float32) -> Tensor:
    return graph.make_variable(hint, dtype=dtype)


def _const(graph: Graph, value: Any, hint: str, dtype: Any = np.float32) -> Tensor:
    return graph.make_constant(np.asarray(value, dtype=dtype), hint)


def _op(graph: Graph, op: str, inputs: Sequence[Tensor], hint: str, dtype: Any = np.float32, **attrs: Any) -> Tensor:
    out = _var(graph, hint, dtype)
    graph.add_node(op, list(inputs), [out], attrs, name=hint)
    return out


def _reduce(graph: Graph, op: str, x: Tensor, hint: str) -> Tensor:
    """ReduceMin/ReduceMax over the last axis, keepdims (axes is an input from opset 18)."""
    if graph.opset >= 18:
        return _op(graph, op, [x, _const(graph, [-1], f"{hint}_axes", np.int64)], hint, keepdims=1)
    return _op(graph, op, [x], hint, axes=[-1], keepdims=1)


@dataclass
class _TokenQuant:
    xq: Tensor  # uint8 [..., K]
    scale: Tensor  # float [..., 1]
    zero: Tensor  # float [..., 1] (the zero point, as a float)


def _per_token(graph: Graph, x: Tensor, base: str) -> _TokenQuant:
    """Asymmetric uint8 quantization of ``x`` with one scale and zero point per row (last axis)."""
    mn = _op(
        graph, "Min", [_reduce(graph, "ReduceMin", x, f"{base}_min"), _const(graph, 0.0, f"{base}_0")], f"{base}_mn"
    )
    mx = _op(
        graph, "Max", [_reduce(graph, "ReduceMax", x, f"{base}_max"), _const(graph, 0.0, f"{base}_0")], f"{base}_mx"
    )
    rng = _op(graph, "Sub", [mx, mn], f"{base}_rng")
    scale = _op(
        graph,
        "Max",
        [
            _op(graph, "Div", [rng, _const(graph, 255.0, f"{base}_255")], f"{base}_s0"),
            _const(graph, 1e-12, f"{base}_eps"),
        ],
        f"{base}_scale",
    )
    zero = _op(
        graph, "Round", [_op(graph, "Div", [_op(graph, "Neg", [mn], f"{base}_neg"), scale], f"{base}_z0")], f"{base}_zp"
    )
    shifted = _op(
        graph,
        "Add",
        [_op(graph, "Round", [_op(graph, "Div", [x, scale], f"{base}_xs")], f"{base}_xr"), zero],
        f"{base}_xz",
    )
    clipped = _op(
        graph, "Clip", [shifted, _const(graph, 0.0, f"{base}_lo"), _const(graph, 255.0, f"{base}_hi")], f"{base}_xc"
    )
    xq = _op(graph, "Cast", [clipped], f"{base}_q", np.uint8, to=TensorProto.UINT8)
    return _TokenQuant(xq, scale, zero)


def _matmul_weight(graph: Graph, node: Node, w: np.ndarray) -> tuple[np.ndarray, float]:
    """The weight as [K, N] and the factor (Gemm's alpha) that multiplies the product."""
    if node.op == "Gemm":
        return (w.T if node.attrs.get("transB", 0) else w), float(node.attrs.get("alpha", 1.0))
    return w, 1.0


def quantize_dynamic_matmul(
    graph: Graph,
    node: Node,
    *,
    per_token: bool,
    per_channel: bool = True,
    reduce_range: bool = False,
    shared: dict[tuple[str, bool], Any] | None = None,
) -> None:
    """Rewrite ``x @ W`` (MatMul, or Gemm without transA) into int8 compute with activations
    quantized at run time: per tensor (``DynamicQuantizeLinear``, shared by every layer reading
    the same ``x``) or per token (a scale and zero point per row). The output tensor keeps its
    name."""
    shared = {} if shared is None else shared
    x, y = node.inputs[0], node.outputs[0]
    w, alpha = _matmul_weight(graph, node, graph.constant(node.inputs[1]))
    q, ws = quantize_symmetric(w, 1 if per_channel else None, reduce_range=reduce_range)
    # Internal tensors get short names (q<k>/...): ONNX files repeat every name in value_info,
    # node inputs and outputs, and long export-style names would cost ~0.1% of the bytes.
    count = shared.setdefault(("count", False), [0])
    count[0] += 1
    base = f"q{count[0]}"
    wq = graph.make_constant(q, f"{node.inputs[1].name}_int8")
    w_scale = ws * np.float32(alpha)
    key = (x.name, per_token)
    if per_token:
        tq = shared.get(key)
        if tq is None:
            tq = shared[key] = _per_token(graph, x, f"{base}/x")
        acc = _op(graph, "MatMulInteger", [tq.xq, wq], f"{base}/i32", np.int32)
        matmul = graph.producer(acc)
        accf = _op(graph, "Cast", [acc], f"{base}/f", to=TensorProto.FLOAT)
        # sum_k (xq - z) W = xq @ W - z * colsum(W): the zero point per row enters here.
        colsum = _const(graph, q.astype(np.float32).sum(axis=0), f"{base}/colsum")
        corr = _op(graph, "Mul", [tq.zero, colsum], f"{base}/zc")
        centered = _op(graph, "Sub", [accf, corr], f"{base}/c")
        scale = _op(graph, "Mul", [tq.scale, _const(graph, w_scale, f"{base}/ws")], f"{base}/s")
        out_in = [centered, scale]
    else:
        dq = shared.get(key)
        if dq is None:
            xb = f"{base}/x"
            xq = _var(graph, f"{xb}/u8", np.uint8)
            xs, xz = _var(graph, f"{xb}/s"), _var(graph, f"{xb}/z", np.uint8)
            graph.add_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{xb}/dql")
            dq = shared[key] = (xq, xs, xz)
        xq, xs, xz = dq
        acc = _op(graph, "MatMulInteger", [xq, wq, xz], f"{base}/i32", np.int32)
        matmul = graph.producer(acc)
        accf = _op(graph, "Cast", [acc], f"{base}/f", to=TensorProto.FLOAT)
        scale = _op(graph, "Mul", [xs, _const(graph, w_scale, f"{base}/ws")], f"{base}/s")
        out_in = [accf, scale]
    bias = None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        c = graph.constant(node.inputs[2])
        beta = float(node.attrs.get("beta", 1.0))
        bias = _const(graph, c * beta, f"{base}/bias") if c is not None else None
        if bias is None:  # a run-time C: scale it in the graph
            bias = _op(graph, "Mul", [node.inputs[2], _const(graph, beta, f"{base}/beta")], f"{base}/cb")
    graph.remove_nodes([node])
    # The last node keeps the layer's name: the report follows layers by node name.
    if bias is None:
        graph.add_node("Mul", out_in, [y], name=f"{base}/out")
    else:
        prod = _op(graph, "Mul", out_in, f"{base}/mm")
        graph.add_node("Add", [prod, bias], [y], name=f"{base}/out")
    # The int8 matmul keeps the layer's name (the report follows layers by name); the removed
    # node's name is free again, which fresh_name does not know.
    matmul.name = node.name


def quantize_weight_only(
    graph: Graph, node: Node, layer: Layer, *, per_channel: bool = True, reduce_range: bool = False
) -> None:
    """Store the weight as int8 read through a DequantizeLinear (float compute)."""
    w = graph.constant(node.inputs[layer.weight_index])
    q, s = quantize_symmetric(w, layer.axis if per_channel else None, reduce_range=reduce_range)
    name = node.inputs[layer.weight_index].name
    out = _var(graph, f"{name}_dq")
    graph.add_node(
        "DequantizeLinear",
        [graph.make_constant(q, f"{name}_int8"), graph.make_constant(s, f"{name}_scale")],
        [out],
        {"axis": layer.axis} if per_channel else {},
        name=f"{node.name}_wdq",
    )
    graph.set_input(node, layer.weight_index, out)


def quantize_gather(graph: Graph, node: Node, *, per_channel: bool = True, reduce_range: bool = False) -> None:
    """An embedding lookup on an int8 table: Gather the int8 rows, then DequantizeLinear with one
    scale per column (the last axis of the gathered rows) or one for the table."""
    table = node.inputs[0]
    q, s = quantize_symmetric(graph.constant(table), 1 if per_channel else None, reduce_range=reduce_range)
    y = node.outputs[0]
    rows = _var(graph, f"{table.name}_rows", np.int8)  # a handful per model: keep the readable name
    graph.add_node(
        "Gather",
        [graph.make_constant(q, f"{table.name}_int8"), node.inputs[1]],
        [rows],
        {"axis": 0},
        name=f"{node.name}_q",
    )
    graph.remove_nodes([node])
    last = graph.add_node(
        "DequantizeLinear",
        [rows, graph.make_constant(s, f"{table.name}_scale")],
        [y],
        {"axis": -1} if per_channel else {},
    )
    last.name = node.name


# --------------------------------------------------------------------------- calibration


class CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over a data set, in batches the model
    accepts: a fixed batch dimension is honoured (the last batch padded by repeating samples),
    a symbolic one gets ``batch`` samples at a time. ``on_batch`` is called after every batch
    (a progress bar)."""

    def __init__(
        self, data: Dataset, model: onnx.ModelProto, batch: int = 16, on_batch: Callable[[], None] | None = None
    ):
        self.size = fixed_batch(model) or batch
        self.data, self.on_batch = data, on_batch
        self.batches = -(-len(data) // self.size)
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        # ONNX Runtime returns a graph input that is also an output (the calibrators add the inputs
        # as outputs) as a view of the caller's array without holding a reference, and its histogram
        # calibrators (entropy, percentile) read those views after the last batch: every batch stays
        # alive as long as the reader, or the histograms read freed memory (NaN, at random).
        self._kept: list[dict[str, np.ndarray]] = []

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        for b in self.data.batches(self.size):
            feeds, n = b.inputs, len(b)
            if n < self.size:
                pad = np.concatenate([np.arange(n), np.arange(self.size - n) % n])
                feeds = {k: v[pad] for k, v in feeds.items()}
            yield feeds

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._gen()
        feeds = next(self._it, None)
        if feeds is not None:
            self._kept.append(feeds)
            if self.on_batch is not None:
                self.on_batch()
        return feeds

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return self.batches


def entropy_range(
    hist: np.ndarray, edges: np.ndarray, lowest: float, highest: float, num_quantized_bins: int = 128
) -> tuple[float, float]:
    """The clipping range that minimises KL(p || q) between the activation histogram ``p``
    (symmetric around zero, outliers folded into the end bins) and its ``num_quantized_bins``-level
    quantization ``q`` (TensorRT's entropy calibration, as onnxruntime.quantization computes it,
    vectorized: ORT's Python loop took 1.6 s per tensor here), clipped to the observed range."""
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    zero, half = n // 2, num_quantized_bins // 2
    if zero < half:  # fewer bins than levels: nothing to clip
        return float(lowest), float(highest)
    cum = np.concatenate([[0.0], np.cumsum(h)])

    def kl_at(i: int) -> float:
        start, end = zero - i, min(zero + i + 1, n)
        sliced = h[start:end]
        p = sliced.copy()
        p[0] += cum[start]
        p[-1] += cum[n] - cum[end]
        m = sliced.size // num_quantized_bins
        body = num_quantized_bins * m
        merged = sliced[:body].reshape(num_quantized_bins, m).sum(axis=1)
        merged[-1] += sliced[body:].sum()
        nonzero = sliced != 0
        counts = nonzero[:body].reshape(num_quantized_bins, m).sum(axis=1)
        q = np.zeros_like(p)
        q[:body] = np.repeat(np.where(counts > 0, merged / np.maximum(counts, 1), 0.0), m) * nonzero[:body]
        return _kl(p, q)

    # Coarse to fine: about 64 candidates across the range, then every threshold around the best
    # (the divergence is smooth in the threshold; ~10x fewer evaluations than every one).
    step = max(1, (zero - half) // 64)
    coarse = {i: kl_at(i) for i in range(half, zero + 1, step)}
    centre = min(coarse, key=lambda i: (coarse[i], i))
    fine = {i: kl_at(i) for i in range(max(half, centre - step), min(zero, centre + step) + 1)}
    fine.update(coarse)
    best_i = min(fine, key=lambda i: (fine[i], i))
    start, end = zero - best_i, min(zero + best_i + 1, n)
    lo, hi = float(edges[start]), float(edges[end])
    return max(lo, float(lowest)), min(hi, float(highest))


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL divergence of two unnormalised histograms after smoothing their empty bins."""
    out = []
    for d in (p, q):
        zeros = d == 0
        nz = d.size - int(zeros.sum())
        if nz == 0:
            return np.inf
        d = d / d.sum()
        d = d + eps * zeros - (eps * zeros.sum() / nz) * ~zeros
        if np.any(d <= 0):
            return np.inf
        out.append(d)
    p, q = out
    return float(np.sum(p * np.log(p / q)))


# --------------------------------------------------------------------------- probe


@dataclass
class _Switch:
    layer: str
    variant: str


@dataclass
class Probe:
    """The float model with one switch per (layer, variant): see the module docstring.

    ``variants`` maps a layer name to its fake quantizations: ``weight`` (weight only; the
    weight from ``fake_weights`` where given, else int8),
    ``tensor`` (weight + dynamic per-tensor input), ``token`` (weight + dynamic per-token
    input), ``static`` (weight + input through the calibrated scale and zero point in
    ``ranges[input name]``).
    """

    graph: Graph
    layers: list[Layer]
    variants: dict[str, list[str]]
    per_channel: dict[str, bool] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    reduce_range: bool = False
    fake_weights: dict[str, np.ndarray] = field(default_factory=dict)  # overrides int8 (e.g. binary)
    switches: list[_Switch] = field(default_factory=list)
    _session: Any = None

    def build(self) -> Probe:
        g = self.graph.copy()
        by_name = {n.name: n for n in g.nodes}
        probe = g.make_variable(PROBE_INPUT, dtype=np.float32, shape=["switches"])
        g.inputs.append(probe)
        deltas: dict[tuple[str, str], Tensor] = {}
        for layer in self.layers:
            node = by_name[layer.name]
            flags = []
            for variant in self.variants[layer.name]:
                j = len(self.switches)
                self.switches.append(_Switch(layer.name, variant))
                flags.append(
                    (variant, _op(g, "Gather", [probe, _const(g, j, f"gsp_i{j}", np.int64)], f"gsp_p{j}", axis=0))
                )
            on = flags[0][1]
            for _, f in flags[1:]:
                on = _op(g, "Add", [on, f], f"gsp_on_{layer.name}")
            w_t = node.inputs[layer.weight_index]
            w = g.constant(w_t)
            wfq = self.fake_weights[layer.name] if layer.name in self.fake_weights else self._weight_fq(w, layer)
            delta = _const(g, wfq - w, f"gsp_dw_{layer.name}")
            w_eff = _op(g, "Add", [w_t, _op(g, "Mul", [on, delta], f"gsp_mw_{layer.name}")], f"gsp_w_{layer.name}")
            g.set_input(node, layer.weight_index, w_eff)
            ai = layer.activation_index
            if ai is None:
                continue
            x = node.inputs[ai]
            x_eff = x
            for variant, f in flags:
                if variant == "weight":
                    continue
                key = (x.name, variant)
                if key not in deltas:
                    deltas[key] = _op(g, "Sub", [self._act_fq(g, x, variant), x], f"gsp_dx_{variant}_{x.name}")
                x_eff = _op(
                    g, "Add", [x_eff, _op(g, "Mul", [f, deltas[key]], f"gsp_mx_{layer.name}")], f"gsp_x_{layer.name}"
                )
            g.set_input(node, ai, x_eff)
        g.toposort()
        self._session = ort_session(g.to_model(), optimize=True)
        return self

    def _weight_fq(self, w: np.ndarray, layer: Layer) -> np.ndarray:
        axis = layer.axis if self.per_channel.get(layer.name, True) else None
        q, s = quantize_symmetric(w, axis, reduce_range=self.reduce_range)
        return dequantize(q, s, axis)

    def _act_fq(self, g: Graph, x: Tensor, variant: str) -> Tensor:
        base = f"gsp_{variant}_{x.name}"
        if variant == "tensor":
            xq, xs, xz = _var(g, f"{base}_q", np.uint8), _var(g, f"{base}_s"), _var(g, f"{base}_z", np.uint8)
            g.add_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{base}_dql")
            return _op(g, "DequantizeLinear", [xq, xs, xz], f"{base}_dq")
        if variant == "token":
            tq = _per_token(g, x, base)
            xf = _op(g, "Cast", [tq.xq], f"{base}_f", to=TensorProto.FLOAT)
            return _op(g, "Mul", [_op(g, "Sub", [xf, tq.zero], f"{base}_c"), tq.scale], f"{base}_dq")
        if variant == "static":
            lo, hi = self.ranges[x.name]
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = (hi - lo) / 255.0 if hi > lo else 1.0
            z = int(np.clip(np.rint(-lo / s), 0, 255))
            sc, zp = _const(g, s, f"{base}_s"), _const(g, z, f"{base}_z", np.uint8)
            xq = _op(g, "QuantizeLinear", [x, sc, zp], f"{base}_q", np.uint8)
            return _op(g, "DequantizeLinear", [xq, sc, zp], f"{base}_dq")
        raise ValueError(f"unknown variant {variant}")

    def vector(self, assignment: dict[str, str]) -> np.ndarray:
        """The probe input that switches on ``assignment`` (layer -> variant); other layers float."""
        return np.array([1.0 if assignment.get(s.layer) == s.variant else 0.0 for s in self.switches], np.float32)

    def run(self, data: Dataset, assignment: dict[str, str], batch_size: int = 64) -> list[np.ndarray]:
        p = self.vector(assignment)
        chunks = []
        size = fixed_batch(self._session) or batch_size
        for b in data.batches(size):
            feeds = dict(b.inputs)
            n = len(b)
            if n < size and fixed_batch(self._session):
                pad = np.concatenate([np.arange(n), np.full(size - n, n - 1)])
                feeds = {k: v[pad] for k, v in feeds.items()}
            feeds[PROBE_INPUT] = p
            outs = self._session.run(None, feeds)
            chunks.append([o[:n] if np.ndim(o) and len(o) >= n else o for o in outs])
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
