"""``graphslim search``: the fastest (or smallest) model within an accuracy budget, searched over
per-layer pruning, low-rank, int8 and block-sparsity knobs, on latency measured on the target.

1. **Knobs.** The model is canonicalized (the default pipeline) and every knob that applies is
   listed: a keep ratio per channel group (``prune-channels{layer_ratios}``) and per attention
   layer (``prune-heads{layer_ratios}``), an SVD rank ratio or none per weight layer
   (``factorize-svd{layer_ranks}``), int8 or float per weight layer (``quantize-int8{exclude}``),
   and with a TVM target a block sparsity or none per layer (``sparsify-blocks{layer_sparsity}``).
   Every knob is a pass option, so a point of the space is a pipeline, and the chosen one is
   written as a recipe that ``graphslim optimize --recipe`` turns into the same model.
2. **Sensitivity.** Each knob value alone, on a subset of the held-out data. Values that alone
   lose more than the budget (plus the noise of the subset) leave the space; a greedy
   combination of the rest (most saving per point lost first) seeds the study.
3. **Study.** A constrained multi-objective Optuna study (TPE by default, or NSGA-II) minimizes
   (points lost, cost) under the budgets. Every trial builds its candidate, measures the metric
   on the held-out data and the cost. Latency is *estimated* from a per-layer latency table: each
   weight layer of a candidate (with its QDQ nodes) is timed alone on the runtime (ONNX Runtime,
   or TVM for ``--target``) once per signature of its shapes and form, and cached in the study
   folder; estimate = measured(original) - sum(original layers) + sum(candidate layers).
4. **Validation.** The feasible Pareto candidates are timed end to end (interleaved rounds,
   medians); the fastest (for ``bytes``/``macs``: the smallest) within the budgets is rebuilt by
   :func:`graphslim.run.optimize` into OUT, whose report gets a ``search`` section.

The study lives in an Optuna storage (a SQLite file beside OUT by default, or a database URL), so
an interrupted search continues where it stopped and worker processes, on this machine
(``workers``) or on others (the same command with the same storage and study), share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from graphslim.analysis.channels import channel_groups
from graphslim.analysis.cost import bind_dims, cost_model
from graphslim.core.data import Dataset
from graphslim.core.errors import GraphslimError, InputError
from graphslim.core.fs import atomic_write, check_out_dir
from graphslim.core.ir import Graph, load_model, model_file_sha256
from graphslim.core.ops import weight_matrix
from graphslim.core.version import __version__
from graphslim.pipeline import Pass, PassContext, PassManager, Pipeline, get_pass
from graphslim.run.optimize import DataRoles, OptimizeResult, data_roles, model_digest, optimize
from graphslim.run.options import RunOptions, SearchOptions
from graphslim.transforms.pruning import Rounding

__all__ = [
    "PRUNE_RATIOS",
    "SPARSITIES",
    "SVD_RATIOS",
    "Knob",
    "LatencyTable",
    "SearchResult",
    "Space",
    "discover_knobs",
    "Timing",
    "pareto_front",
    "require_optuna",
    "search",
]

log = logging.getLogger(__name__)

#: Knob values. ``choices[0]`` of every knob leaves its layer alone.
PRUNE_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
SVD_RATIOS = (0.0, 0.5, 0.375, 0.25, 0.125, 0.0625)  # rank ratio; 0: not factorized
SPARSITIES = (0.0, 0.6, 0.75, 0.9)  # the backend's BSR kernels take layers from 0.6
SPARSE_BLOCK = (16, 1)  # the block the BSR conv and dense kernels both take
_MIN_SAVING = 0.1  # factorize-svd's default min_saving: ranks that save less are not offered
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_EVAL_SAMPLES = 2000  # as many held-out samples as optimize's report uses, so the numbers agree
_N_CONSTRAINTS = 3  # accuracy, compression, latency (a budget not given is always met)
SPACE_ATTR, SETTINGS_ATTR = "graphslim_space", "graphslim_settings"


def require_optuna() -> ModuleType:
    """Optuna, or an InputError (exit 2) naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise InputError("graphslim search needs Optuna: pip install 'graphslim[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# --------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Knob:
    """One per-layer decision: ``kind`` (prune, heads, svd, int8, sparse), the layer or group
    ``name`` the pass option uses, and its values (``choices[0]`` leaves it alone)."""

    kind: str
    name: str
    choices: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "choices": list(self.choices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Knob:
        return cls(d["kind"], d["name"], tuple(float(c) for c in d["choices"]))


def _distinct_ratios(group: Any, ratios: Sequence[float]) -> tuple[float, ...]:
    """The ratios that keep different unit counts in ``group`` (the first of each)."""
    rounding, seen, out = Rounding(), set(), []
    for r in ratios:
        keep = rounding.keep(group, group.size - int(math.floor(r * group.size + 1e-9)))
        if keep not in seen:
            seen.add(keep)
            out.append(r)
    return tuple(out)


def discover_knobs(graph: Graph, techniques: Sequence[str], *, sparse: bool = False) -> list[Knob]:
    """The knobs that apply to ``graph`` (canonicalized, shapes inferred) for ``techniques``;
    ``sparse`` knobs only where a sparse backend (TVM) runs the result."""
    knobs: list[Knob] = []
    an = channel_groups(graph)
    for g in an.groups:
        kind = {"channels": "prune", "heads": "heads"}.get(g.kind)
        if not g.prunable or kind not in techniques:
            continue
        name = an.roots[g.roots[0]].origin
        if kind == "prune":
            choices = _distinct_ratios(g, PRUNE_RATIOS)
        else:  # k heads of n: the 1e-4 keeps floor(ratio * n) at k after rounding to 6 digits
            choices = _distinct_ratios(g, [round(k / g.size + 1e-4, 6) if k else 0.0 for k in range(g.size)])
        if len(choices) > 1:
            knobs.append(Knob(kind, name, choices))
    layer_knobs: dict[str, list[Knob]] = {"svd": [], "int8": [], "sparse": []}
    for node in graph.nodes:
        if node.op not in _WEIGHT_OPS or not node.name:
            continue
        m = weight_matrix(graph, node)
        if m is None or graph.constant(node.inputs[0]) is not None:
            continue
        rows, cols = m.shape
        svd_ok = not (node.op == "Conv" and int(node.attrs.get("group", 1)) != 1) and not (
            node.op == "Gemm" and node.attrs.get("transA", 0)
        )
        if "svd" in techniques and svd_ok:
            full, ranks, choices = min(rows, cols), set(), [0.0]
            for r in SVD_RATIOS[1:]:
                k = max(1, min(full, int(round(r * full))))  # factorize-svd's rounding
                if k not in ranks and 1.0 - k * (rows + cols) / (rows * cols) >= _MIN_SAVING:
                    ranks.add(k)
                    choices.append(r)
            if len(choices) > 1:
                layer_knobs["svd"].append(Knob("svd", node.name, tuple(choices)))
        if "int8" in techniques:
            layer_knobs["int8"].append(Knob("int8", node.name, (0.0, 1.0)))
        if "sparse" in techniques and sparse and rows >= SPARSE_BLOCK[0]:
            layer_knobs["sparse"].append(Knob("sparse", node.name, SPARSITIES))
    return knobs + layer_knobs["svd"] + layer_knobs["sparse"] + layer_knobs["int8"]


def _num(v: float) -> str:
    return f"{v:.6g}"


@dataclass(frozen=True)
class Space:
    """The knobs of a study and how a choice of values becomes a pipeline."""

    knobs: tuple[Knob, ...]
    prefix: str  # the canonicalization pipeline every candidate starts with
    heads_criterion: str = "l2"  # prune-heads{criterion}: activation when there is training data

    def values(self, indices: dict[str, int]) -> dict[str, float]:
        """Knob key -> value for Optuna's per-knob choice indices (missing knobs: left alone)."""
        return {k.key: k.choices[int(indices.get(k.key, 0))] for k in self.knobs}

    def indices(self, values: dict[str, float]) -> dict[str, int]:
        return {k.key: k.choices.index(values.get(k.key, k.choices[0])) for k in self.knobs}

    def choice_key(self, values: dict[str, float]) -> str:
        """The values that change something, as canonical text (equal keys, equal candidates)."""
        return json.dumps({k: v for k, v in sorted(values.items()) if v}, sort_keys=True)

    def structural(self, values: dict[str, float]) -> list[Pass]:
        """The passes before quantization for ``values``."""

        def items(kind: str) -> tuple[str, ...]:
            return tuple(
                f"{k.name}={_num(values[k.key])}" for k in self.knobs if k.kind == kind and values.get(k.key, 0.0)
            )

        passes: list[Pass] = []
        if prune := items("prune"):
            passes.append(get_pass("prune-channels")(ratio=0.0, layer_ratios=prune))
        if heads := items("heads"):
            passes.append(get_pass("prune-heads")(ratio=0.0, layer_ratios=heads, criterion=self.heads_criterion))
        if ranks := items("svd"):
            passes.append(get_pass("factorize-svd")(layer_ranks=ranks))
        if sparse := items("sparse"):
            passes.append(get_pass("sparsify-blocks")(sparsity=0.0, block=list(SPARSE_BLOCK), layer_sparsity=sparse))
        return passes

    def int8_layers(self, values: dict[str, float]) -> set[str]:
        return {k.name for k in self.knobs if k.kind == "int8" and values.get(k.key, 0.0)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "knobs": [k.to_dict() for k in self.knobs],
            "prefix": self.prefix,
            "heads_criterion": self.heads_criterion,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Space:
        return cls(tuple(Knob.from_dict(k) for k in d["knobs"]), d["prefix"], d.get("heads_criterion", "l2"))


def quantize_pass(graph: Graph, layers: set[str], factorized: set[str]) -> Pass:
    """quantize-int8 for exactly ``layers`` (and the low-rank first half of the factorized ones):
    every other Conv/Gemm/MatMul, attention matmuls included, goes to its exclude list, and the
    pass's own sensitivity choice is off (the search made it)."""
    quant = set()
    for node in graph.nodes:
        if node.name in layers:
            quant.add(node.name)
            if node.name in factorized:  # factorize-svd feeds the layer from its first half
                first = graph.producer(node.inputs[0])
                if first is not None and first.name:
                    quant.add(first.name)
    exclude = sorted({n.name for n in graph.nodes if n.op in _WEIGHT_OPS and n.name and n.name not in quant})
    return get_pass("quantize-int8")(exclude=exclude, sensitivity=False)


# --------------------------------------------------------------------------- the metric


class Judge:
    """The model's metric on held-out data: :class:`graphslim.core.metrics.Evaluator` with the
    run's ``--metric`` (auto: accuracy with labels, agreement for classifier outputs, mask-pooled
    cosine for hidden states, cosine otherwise). ``drop`` is in points, ``100 * (reference -
    value)``, as the report's budget."""

    def __init__(self, original: onnx.ModelProto, data: Dataset, metric: str = "auto"):
        from graphslim.core.metrics import Evaluator
        from graphslim.core.runtime import ort_session, run_model

        self.data, self.metric = data, metric
        self.ref = run_model(ort_session(original), data)
        self._ev = Evaluator(original, data, metric=metric, reference_outputs=self.ref)
        self.kind = self._ev.spec.name  # accuracy, agreement, pooled_cosine, cosine, mse
        self.name = self._ev.spec.describe()
        self.reference = float(self._ev.reference_value)

    def value(self, model: onnx.ModelProto) -> float:
        return float(self._ev.score(model).value)

    def drop(self, value: float) -> float:
        return round(100.0 * (self.reference - value), 4)


# --------------------------------------------------------------------------- latency


def _fixed_inputs(model: onnx.ModelProto, sample: Dataset) -> onnx.ModelProto:
    """A copy whose graph inputs have the shapes of ``sample`` (the timing batch): compilers and
    timing need static shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits or vi.name not in sample.inputs:
            continue
        shape = sample.inputs[vi.name].shape
        dims = vi.type.tensor_type.shape.dim
        for d, v in zip(dims, shape, strict=False):
            d.Clear()
            d.dim_value = int(v)
    return m


@dataclass
class _Layer:
    name: str
    signature: str
    what: str
    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]


def _layers(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], with_values: bool) -> list[_Layer]:
    """Each weight layer of ``model`` as a model of its own: the layer, its weight's and
    activation's QuantizeLinear/DequantizeLinear and the requantization of its output where the
    model has them (int8 layers run as one fused kernel). ``shapes``: the activation shapes."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}

    def const_chain(name: str) -> list[onnx.NodeProto] | None:
        if name in inits:
            return []
        p = producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
            return [p]
        return None

    out: list[_Layer] = []
    for n in g.node:
        if n.op_type not in _WEIGHT_OPS or len(n.input) < 2:
            continue
        w_chain = const_chain(n.input[1])
        if w_chain is None:
            continue
        nodes: list[onnx.NodeProto] = []
        x = n.input[0]
        dq = producer.get(x)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            nodes += [q, dq]
            x = q.input[0]
        if x not in shapes:
            continue
        nodes += w_chain
        for extra in n.input[2:]:
            chain = const_chain(extra) if extra else []
            if chain is None:
                break
            nodes += chain
        else:
            nodes.append(n)
            y = n.output[0]
            after = consumers.get(y, [])
            if len(after) == 1 and after[0].op_type == "QuantizeLinear":
                dqs = consumers.get(after[0].output[0], [])
                if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear":
                    nodes += [after[0], dqs[0]]
                    y = dqs[0].output[0]
            sub, sig, what = _layer_model(model, nodes, x, y, shapes[x], inits, with_values)
            out.append(_Layer(n.name or y, sig, what, sub, x, tuple(shapes[x])))
    return out


def _layer_model(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    x: str,
    y: str,
    shape: tuple[int, ...],
    inits: dict[str, onnx.TensorProto],
    with_values: bool,
) -> tuple[onnx.ModelProto, str, str]:
    """One layer's ``nodes`` as a model from ``x`` (of ``shape``) to ``y``, with its signature
    (a hash of the ops, attributes, shapes and, ``with_values``, weight zeros: layers with the
    same signature time the same) and a short description."""
    used = {i for m in nodes for i in m.input if i in inits}
    graph = onnx.helper.make_graph(
        nodes,
        "layer",
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, list(shape))],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)],
        initializer=[inits[i] for i in sorted(used)],
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    desc = {
        "ops": [m.op_type for m in nodes],
        "attrs": [sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in m.attribute) for m in nodes],
        "x": list(shape),
        "w": sorted((i, list(inits[i].dims), inits[i].data_type) for i in used),
    }
    if with_values:  # sparse kernels: the zeros matter, not just the shapes
        desc["zeros"] = {
            i: round(float(np.mean(onnx.numpy_helper.to_array(inits[i]) == 0)), 2)
            for i in used
            if len(inits[i].dims) >= 2
        }
    sig = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]
    what = f"{'+'.join(sorted(set(desc['ops'])))} x{list(shape)}"
    return sub, sig, what


@dataclass(frozen=True)
class Timing:
    """How latency is timed: on ONNX Runtime (all graph optimizations) or TVM for ``target``,
    with ``threads`` (None: the runtime's default), by the ``wall`` clock or by ``cpu`` time (the
    calling thread's CPU time, single-threaded: on a shared machine it measures the model, not the
    other processes; an idle machine gives the same number as the wall clock)."""

    target: str | None = None
    threads: int | None = None
    clock: str = "wall"
    rpc: tuple[str, str] | None = None  # (tracker, key): time on a device of the tracker instead
    rpc_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise InputError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.rpc is not None and not self.target:
            raise InputError("--rpc-tracker/--rpc-key time candidates on a device: give --target too")
        if self.rpc is not None and self.clock == "cpu":
            raise InputError("--clock cpu times this machine's thread; a device is timed by its own clock")
        if self.clock == "cpu" and self.threads not in (None, 1):
            raise InputError("--clock cpu times one thread: give --threads 1 (or leave it out)")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be >= 1")

    @property
    def n_threads(self) -> int | None:
        return 1 if self.clock == "cpu" else self.threads

    @property
    def label(self) -> str:
        runtime = f"tvm {self.target}" if self.target else "onnxruntime"
        if self.rpc is not None:
            return f"{runtime} on a device of key '{self.rpc[1]}'"
        threads = f", {self.n_threads} thread{'s' if self.n_threads != 1 else ''}" if self.n_threads else ""
        return runtime + threads + (", cpu clock" if self.clock == "cpu" else "")

    @property
    def key(self) -> str:
        device = f"-rpc-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.rpc[1])}" if self.rpc is not None else ""
        return f"{(self.target or 'ort').replace('/', '_')}-t{self.n_threads or 0}-{self.clock}{device}"

    def runner(self, model: onnx.ModelProto, sample: Dataset) -> Callable[[], Any]:
        """A zero-argument call that runs ``model`` once on ``sample`` (one batch)."""
        feeds = dict(sample.inputs)
        if not self.target:
            from graphslim.core.runtime import ort_session

            sess = ort_session(model, optimize=True, threads=self.n_threads or 0)
            return lambda: sess.run(None, feeds)
        from graphslim.backend import build, load_artifact

        export, _ = build(_fixed_inputs(model, sample), self.target, batch=len(sample))
        tmp = tempfile.TemporaryDirectory(prefix="graphslim-search-tvm-")
        export(Path(tmp.name))
        if self.rpc is not None:
            return _DeviceRun(tmp, sample, self.rpc, self.rpc_timeout)
        runner = load_artifact(tmp.name, threads=self.n_threads or None)  # TVM's thread-pool API, not the environment
        call = lambda: runner(feeds)  # noqa: E731
        call.keep = tmp  # type: ignore[attr-defined] - the library's folder lives as long as the call
        return call

    def median_ms(self, fn: Callable[[], Any], runs: int, warmup: int = 0, max_seconds: float = 1e9) -> float:
        """Median ms of ``runs`` calls (fewer, but at least 3, once ``max_seconds`` have passed)."""
        if isinstance(fn, _DeviceRun):  # timed on the device, by its own clock
            return fn.median_ms(runs, warmup, max_seconds)
        # One ORT thread computes on the calling thread; TVM's runtime may use a worker of its own.
        clock = time.perf_counter if self.clock == "wall" else (time.process_time if self.target else time.thread_time)
        for _ in range(warmup):
            fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < max_seconds):
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
        return float(np.median(times))

    def interleaved(self, calls: Sequence[Callable[[], Any]], *, rounds: int = 7, runs: int = 15) -> list[float]:
        """Median ms of each call over ``rounds`` rounds that run every call in turn (each round's
        value: the median of ``runs`` runs), so drifts of the machine hit all calls alike."""
        for c in calls:
            self.median_ms(c, 3, warmup=3)
        per: list[list[float]] = [[] for _ in calls]
        for _ in range(rounds):
            for i, c in enumerate(calls):
                per[i].append(self.median_ms(c, runs))
        return [round(float(np.median(p)), 5) for p in per]


class _DeviceRun:
    """A compiled candidate timed on a device of the tracker (TVM's time_evaluator there, through
    :func:`graphslim.backend.remote.measure_artifact`); not callable here."""

    def __init__(self, folder: Any, sample: Dataset, rpc: tuple[str, str], wait_s: float):
        self.keep, self.sample, self.rpc, self.wait_s = folder, sample, rpc, wait_s  # keep: the artifact's folder

    def __call__(self) -> Any:
        raise RuntimeError("a device candidate is timed on the device, not called here")

    def median_ms(self, runs: int, warmup: int, max_seconds: float) -> float:
        from graphslim.backend.remote import measure_artifact

        res = measure_artifact(
            self.keep.name,
            self.rpc,
            self.sample,
            warmup=max(1, warmup),
            repeat=max(3, runs),
            max_seconds=min(max_seconds, 30.0),
            wait_s=self.wait_s,
        )
        return float(res["median_ms"])


class LatencyTable:
    """Milliseconds per layer signature on one runtime, kept in a JSON file (shared by the
    workers of a study: merged under a lock on every write).

    A layer is timed alone (see :func:`_layers`), minus the runtime's cost of running an empty
    model, which every end-to-end run pays once and a per-layer sum would pay per layer."""

    VERSION = 1

    def __init__(self, path: Path | None, timing: Timing):
        self.path, self.timing = path, timing
        self.runtime = timing.label
        self.entries: dict[str, dict[str, Any]] = {}
        self.timed = 0  # entries this process measured
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if doc.get("version") == self.VERSION and doc.get("runtime") == self.runtime:
            self.entries.update(doc.get("entries", {}))

    def _save(self, new: dict[str, dict[str, Any]]) -> None:
        if self.path is None or not new:
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()
            self.entries.update(new)
            doc = {"version": self.VERSION, "runtime": self.runtime, "entries": self.entries}
            atomic_write(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def _time(self, model: onnx.ModelProto, feeds: Dataset) -> float:
        return self.timing.median_ms(self.timing.runner(model, feeds), 25, warmup=3, max_seconds=1.0)

    def overhead(self) -> float:
        """The runtime's cost of one call of a one-element model."""
        if "overhead" not in self.entries:
            node = onnx.helper.make_node("Relu", ["x"], ["y"])
            graph = onnx.helper.make_graph(
                [node],
                "empty",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])],
            )
            m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
            m.ir_version = 8
            ms = self._time(m, Dataset({"x": np.zeros((1, 1), np.float32)}))
            self.timed += 1
            self.entries["overhead"] = {"ms": ms, "what": "empty model"}
            self._save({"overhead": self.entries["overhead"]})
        return float(self.entries["overhead"]["ms"])

    def layer_times(self, model: onnx.ModelProto, sample: Dataset) -> dict[str, float]:
        """Layer name -> ms for the weight layers of ``model`` (timing the signatures not yet in
        the table); ``sample`` gives the input shapes (the timing batch)."""
        from graphslim.core.runtime import run_with_outputs

        wanted = sorted(
            {
                n.input[0] if n.input[0] else ""
                for n in model.graph.node
                if n.op_type in (*_WEIGHT_OPS, "QuantizeLinear") and n.input
            }
            - {""}
            - {i.name for i in model.graph.initializer}
        )
        shapes: dict[str, tuple[int, ...]] = {
            k: tuple(v.shape) for k, v in sample.inputs.items() if k in {i.name for i in model.graph.input}
        }
        missing = [n for n in wanted if n not in shapes]
        if missing:
            for outs in run_with_outputs(model, sample, missing, batch=len(sample)):
                shapes.update({k: tuple(v.shape) for k, v in outs.items()})
        overhead = self.overhead()
        new: dict[str, dict[str, Any]] = {}
        times: dict[str, float] = {}
        for layer in _layers(model, shapes, with_values=bool(self.timing.target)):
            if layer.signature not in self.entries:
                rng = np.random.default_rng(0)
                feeds = Dataset({layer.input_name: rng.standard_normal(layer.input_shape).astype(np.float32)})
                ms = max(0.0, self._time(layer.model, feeds) - overhead)
                self.timed += 1
                self.entries[layer.signature] = new[layer.signature] = {"ms": round(ms, 5), "what": layer.what}
            times[layer.name] = float(self.entries[layer.signature]["ms"])
        self._save(new)
        return times


# --------------------------------------------------------------------------- a search session


@dataclass
class _Candidate:
    model: onnx.ModelProto
    graph: Graph
    pipeline: Pipeline


@dataclass
class _Setup:
    """What every process of a search (the driver and each worker) rebuilds from the options."""

    src: Path
    opts: SearchOptions
    workdir: Path
    original: onnx.ModelProto
    model_sha: str
    canonical: onnx.ModelProto
    prefix: str
    roles: DataRoles
    judge: Judge
    base_params: int
    bindings: dict[str, int]
    sample: Dataset  # one batch of held-out samples: what latency is timed on
    table: LatencyTable | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str | None:
        return self.opts.run.compile.target

    @property
    def needs_latency(self) -> bool:
        return self.opts.objective == "latency" or self.opts.run.budgets.max_latency_ms is not None


def _setup(src: Path, opts: SearchOptions, workdir: Path) -> _Setup:
    from graphslim.passes import DEFAULT_PIPELINE

    original = load_model(src)
    model_sha = model_file_sha256(src)
    roles = data_roles(original, opts.run)
    if roles.report is None:
        raise InputError(
            "graphslim search measures accuracy on held-out data: give --eval-data (and --train-data), or --data"
        )
    if len(roles.report) < 2:
        raise InputError("the held-out data set needs at least 2 samples")
    held = roles.report.take(_EVAL_SAMPLES)
    if not isinstance(held, Dataset):
        held = Dataset(dict(held.inputs), held.labels)
    graph = Graph.from_model(original)
    graph.infer_shapes()
    base_params = cost_model(graph).params
    PassManager(DEFAULT_PIPELINE).run(graph, PassContext(target=opts.run.compile.target, seed=opts.run.seed))
    canonical = graph.to_model()
    rows = np.arange(opts.batch) % len(held)  # the timing batch (samples repeat if there are fewer)
    sample = Dataset({k: v[rows] for k, v in held.inputs.items()})
    try:
        bindings = bind_dims(graph, {k: (1, *v.shape[1:]) for k, v in sample.inputs.items()})
    except ValueError:
        bindings = None
    table = None
    if opts.objective == "latency" or opts.run.budgets.max_latency_ms is not None:
        timing = _timing(opts)
        table = LatencyTable(workdir / f"latency-{model_sha[:16]}-{timing.key}.json", timing)
    setup = _Setup(
        src,
        opts,
        workdir,
        original,
        model_sha,
        canonical,
        DEFAULT_PIPELINE,
        roles,
        Judge(original, held, opts.run.metric),
        base_params,
        bindings or {},
        sample,
        table,
    )
    setup.settings = _settings(setup)
    return setup


def _settings(s: _Setup) -> dict[str, Any]:
    """What a study's results depend on: a study made for other settings is not continued."""
    h = hashlib.sha256()
    for role in ("data", "train", "eval"):
        ds = s.roles.given.get(role)
        h.update(f"|{role}:".encode())
        if ds is not None:
            ds.fingerprint(h)
    o, b = s.opts, s.opts.run.budgets
    return {
        "model_sha256": s.model_sha,
        "data": h.hexdigest()[:32],
        "eval_fraction": o.run.eval_fraction,
        "objective": o.objective,
        "target": o.run.compile.target,
        "timing": _timing(o).key if s.needs_latency else None,
        "techniques": sorted(o.techniques),
        "max_accuracy_drop": b.max_accuracy_drop,
        "min_compression": b.min_compression,
        "max_latency_ms": b.max_latency_ms,
        "seed": o.run.seed,
        "sensitivity_samples": o.sensitivity_samples,
        "batch": o.batch,
        "graphslim": __version__,
    }


def _timing(opts: SearchOptions) -> Timing:
    c = opts.run.compile
    return Timing(c.target, opts.threads, opts.clock, c.rpc, c.rpc_timeout)


def _max_drop(opts: SearchOptions) -> float:
    b = opts.run.budgets.max_accuracy_drop
    return 1.0 if b is None else float(b)


class _Evaluator:
    """Builds candidates and measures them (one per process)."""

    def __init__(self, setup: _Setup, space: Space, base: dict[str, Any]):
        self.s, self.space, self.base = setup, space, base

    def build(self, values: dict[str, float]) -> _Candidate:
        s = self.s
        graph = Graph.from_model(s.canonical)
        graph.infer_shapes()
        ctx = PassContext(target=s.target, data=s.roles.train, seed=s.opts.run.seed, teacher=s.original)
        passes = self.space.structural(values)
        records = PassManager(passes).run(graph, ctx) if passes else []
        factorized = {
            layer["name"] for r in records if r.name == "factorize-svd" for layer in r.stats.get("layers", [])
        }
        int8 = self.space.int8_layers(values)
        if int8:
            if s.roles.train is None:
                raise InputError("int8 candidates calibrate on training data: give --train-data or --data")
            q = quantize_pass(graph, int8, factorized)
            PassManager([q]).run(graph, ctx)
            passes.append(q)
        return _Candidate(graph.to_model(), graph, Pipeline([*Pipeline.parse(self.space.prefix), *passes]))

    def latency(self, model: onnx.ModelProto) -> float:
        assert self.s.table is not None
        return estimate_latency(self.base, sum(self.s.table.layer_times(model, self.s.sample).values()))

    def measure(self, cand: _Candidate, judge: Judge | None = None) -> dict[str, Any]:
        s = self.s
        judge = judge or s.judge
        value = judge.value(cand.model)
        cost = cost_model(cand.graph, bindings=s.bindings or None)
        res: dict[str, Any] = {
            "pipeline": str(cand.pipeline),
            "metric": round(value, 6),
            "drop_points": judge.drop(value),
            "params": cost.params,
            "macs": cost.macs,
            "bytes": cost.size_bytes,
            "r_params": round(cost.params / s.base_params, 6) if s.base_params else None,
            "sha256": model_digest(cand.model),
        }
        if s.needs_latency:
            res["latency_ms"] = self.latency(cand.model)
        res["constraints"] = self.constraints(res)
        return res

    def constraints(self, res: dict[str, Any]) -> list[float]:
        """<= 0 where met: points lost over the budget, r over --min-compression, estimated ms
        over --max-latency-ms."""
        b = self.s.opts.run.budgets
        out = [res["drop_points"] - _max_drop(self.s.opts), -1.0, -1.0]
        if b.min_compression is not None and res.get("r_params") is not None:
            out[1] = res["r_params"] - b.min_compression
        if b.max_latency_ms is not None and res.get("latency_ms") is not None:
            out[2] = res["latency_ms"] - b.max_latency_ms
        return [round(float(v), 6) for v in out]

    def cost(self, res: dict[str, Any]) -> float:
        return float(res[{"latency": "latency_ms", "bytes": "bytes", "macs": "macs"}[self.s.opts.objective]])


# --------------------------------------------------------------------------- sensitivity and seeds


def _sensitivity(ev: _Evaluator, knobs: list[Knob], progress: bool) -> tuple[list[Knob], list[dict[str, Any]], int]:
    """Each knob value alone on a subset of the held-out data. Returns the knobs with the values
    that stay in the space (those of a monotone knob up to the first one that alone loses more
    than the budget plus noise), every measurement, and how many candidates were evaluated."""
    from tqdm import tqdm

    s = ev.s
    n = min(s.opts.sensitivity_samples, len(s.judge.data))
    judge = s.judge if n >= len(s.judge.data) else Judge(s.original, s.judge.data.take(n), s.judge.metric)
    budget = _max_drop(s.opts)
    # One sample of n is 100/n points: allow the budget plus two samples' worth of noise.
    limit = budget + max(0.5 * budget, 200.0 / n)
    rows: list[dict[str, Any]] = []
    kept: list[Knob] = []
    total = sum(len(k.choices) - 1 for k in knobs)
    bar = tqdm(total=total, desc="search: sensitivity", unit="candidate", disable=not progress, leave=False)
    evaluations = 0
    for knob in knobs:
        allowed = [knob.choices[0]]
        for v in knob.choices[1:]:
            values = {k.key: k.choices[0] for k in ev.space.knobs}
            values[knob.key] = v
            res = ev.measure(ev.build(values), judge)
            evaluations += 1
            bar.update(1)
            row = {"knob": knob.key, "value": v, "drop_points": res["drop_points"], "cost": ev.cost(res)}
            rows.append(row)
            if res["drop_points"] > limit:
                bar.update(len(knob.choices) - 1 - knob.choices.index(v))
                break  # more of the same only loses more
            allowed.append(v)
        if len(allowed) > 1:
            kept.append(replace(knob, choices=tuple(allowed)))
    bar.close()
    return kept, rows, evaluations


def _seeds(
    space: Space, rows: list[dict[str, Any]], base_cost: float, budget: float, samples: int
) -> list[dict[str, float]]:
    """Starting points: greedy combinations of the knob values that save most cost per point lost
    alone, within the whole budget, half and a quarter of it, and the single value that saves most
    within half the budget. Every value is charged at least half a sample's worth of points
    (50 / samples): effects that the subset cannot see still add up when knobs combine."""
    allowed = {k.key: set(k.choices) for k in space.knobs}
    floor = 50.0 / max(samples, 1)
    items = [
        (r["knob"], r["value"], base_cost - r["cost"], max(r["drop_points"], floor))
        for r in rows
        if r["knob"] in allowed and r["value"] in allowed[r["knob"]] and base_cost - r["cost"] > 0
    ]
    items.sort(key=lambda t: (-t[2] / t[3], t[0], t[1]))
    picks: list[dict[str, float]] = []
    for share in (1.0, 0.5, 0.25):
        chosen: dict[str, tuple[float, float, float]] = {}
        spent = 0.0
        for key, value, saving, drop in items:
            old = chosen.get(key)
            d_drop = drop - (old[2] if old else 0.0)
            if (old is None or saving > old[1]) and spent + d_drop <= share * budget:
                chosen[key] = (value, saving, drop)
                spent += d_drop
        picks.append({k: v[0] for k, v in chosen.items()})
    single = [t for t in items if t[3] <= budget / 2]
    if single:
        best = max(single, key=lambda t: (t[2], -t[3]))
        picks.append({best[0]: best[1]})
    seeds: list[dict[str, float]] = []
    for pick in picks:
        values = {k.key: k.choices[0] for k in space.knobs}
        values.update(pick)
        if pick and values not in seeds:
            seeds.append(values)
    return seeds


# --------------------------------------------------------------------------- the study


def _storage(optuna: ModuleType, url: str) -> Any:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 300}}
    try:
        # Heartbeats let a study fail the trials of a worker that was killed, so they run again.
        return optuna.storages.RDBStorage(url, heartbeat_interval=15, grace_period=90, **kwargs)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL
        raise InputError(f"--storage {_safe_url(url)}: {str(e).splitlines()[0]}") from None


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show it as given
        return url


def _sampler(optuna: ModuleType, name: str, seed: int) -> Any:
    # Optuna 5 reads the constraints a trial sets (Trial.set_constraint); Optuna 4 asks a function.
    kw: dict[str, Any] = {} if _new_constraints(optuna) else {"constraints_func": _constraints}
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16, **kw)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8, **kw)


def _new_constraints(optuna: ModuleType) -> bool:
    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints(trial: Any) -> list[float]:
    return list(trial.user_attrs.get("constraints", [1.0] * _N_CONSTRAINTS))


def _set_constraints(optuna: ModuleType, trial: Any, values: Sequence[float]) -> None:
    if _new_constraints(optuna):
        for name, v in zip(("accuracy", "compression", "latency"), values, strict=True):
            trial.set_constraint(name, float(v))


def _open_study(optuna: ModuleType, setup: _Setup, url: str, name: str, *, create: bool, worker: int = 0) -> Any:
    storage = _storage(optuna, url)
    exists = name in optuna.study.get_all_study_names(storage)
    if not exists and not create:
        raise InputError(f"no study '{name}' in {_safe_url(url)} (--resume continues an existing study)")
    study = optuna.load_study(study_name=name, storage=storage) if exists else None
    done = len(study.trials) if study is not None else 0
    seed = setup.opts.run.seed * 7919 + 101 * worker + done
    sampler = _sampler(optuna, setup.opts.sampler, seed)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=["minimize", "minimize"], sampler=sampler, load_if_exists=True
    )
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, setup.settings)
    elif stored != setup.settings:
        diff = sorted(k for k in set(stored) | set(setup.settings) if stored.get(k) != setup.settings.get(k))
        raise InputError(
            f"study '{name}' in {_safe_url(url)} was made for other settings ({', '.join(diff)} differ): "
            "give another --study, or the same model, data and options"
        )
    return study


def _default_study(settings: dict[str, Any]) -> str:
    return "search-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _baseline(setup: _Setup) -> dict[str, Any]:
    """The canonical model's end-to-end latency, its layers' sum in the table and the runtime's
    cost of an empty call (see :func:`estimate_latency`)."""
    base: dict[str, Any] = {}
    if setup.table is not None:
        timing = setup.table.timing
        base["latency_ms"] = timing.interleaved([timing.runner(setup.canonical, setup.sample)])[0]
        base["layers_ms"] = round(sum(setup.table.layer_times(setup.canonical, setup.sample).values()), 5)
        base["overhead_ms"] = round(setup.table.overhead(), 5)
    return base


def estimate_latency(base: Mapping[str, Any], layers_ms: float) -> float:
    """A candidate's end-to-end latency from its layers' sum in the table (layers timed alone):
    the runtime's cost of an empty call, plus the rest of the original's measured latency scaled
    by the candidate's layers' sum over the original's. The original maps to its measured
    latency. Everything else in the model (attention products, softmax, activations, and what
    a layer costs inside the model beyond its time alone) is taken to shrink with the layers:
    pruning heads and FFN channels shrinks those ops too. On a BERT-style encoder (hidden 256)
    the finalists measured 0.70-0.90 ms against estimates of 0.82-0.88 ms this way, and 2.11-2.15
    ms with the original's rest kept constant, the estimate before (still used for a study
    whose baseline has no ``overhead_ms``, so that its trials stay comparable)."""
    latency, base_layers = float(base["latency_ms"]), float(base["layers_ms"])
    if "overhead_ms" not in base:
        return round(max(0.0, latency - base_layers + layers_ms), 5)
    overhead = min(float(base["overhead_ms"]), latency)
    if base_layers <= 0:
        return round(latency, 5)
    return round(overhead + (latency - overhead) * layers_ms / base_layers, 5)


def _prepare(optuna: ModuleType, setup: _Setup, study: Any, progress: bool) -> tuple[Space, dict[str, Any]]:
    """The study's space (made here, with the sensitivity pass and the seeds, if the study has none
    yet) and its baseline."""
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is not None:
        return Space.from_dict(stored["space"]), stored
    from graphslim.passes import DEFAULT_PIPELINE

    t0 = time.perf_counter()
    graph = Graph.from_model(setup.canonical)
    graph.infer_shapes()
    knobs = discover_knobs(graph, setup.opts.techniques, sparse=bool(setup.target))
    criterion = "activation" if setup.roles.train is not None else "l2"
    full = Space(tuple(knobs), DEFAULT_PIPELINE, criterion)
    base = _baseline(setup)
    ev = _Evaluator(setup, full, base)
    reference = ev.measure(ev.build({}))
    kept, rows, n_evaluated = _sensitivity(ev, knobs, progress)
    space = replace(full, knobs=tuple(kept))
    n_sens = min(setup.opts.sensitivity_samples, len(setup.judge.data))
    seeds = _seeds(space, rows, ev.cost(reference), _max_drop(setup.opts), n_sens)
    doc = {
        "space": space.to_dict(),
        "all_knobs": [k.to_dict() for k in knobs],
        "baseline": {**base, **{k: reference[k] for k in ("metric", "drop_points", "params", "macs", "bytes")}},
        "reference_metric": setup.judge.reference,
        "sensitivity": {"evaluations": n_evaluated, "samples": n_sens},
        "sensitivity_rows": rows,
        "setup_seconds": round(time.perf_counter() - t0, 2),
    }
    again = study.user_attrs.get(SPACE_ATTR)  # another machine may have finished first: theirs wins
    if again is not None:
        return Space.from_dict(again["space"]), again
    study.set_user_attr(SPACE_ATTR, doc)
    for values in seeds:
        study.enqueue_trial(space.indices(values), user_attrs={"seeded": True})
    return space, doc


class CandidateFailed(GraphslimError):
    """A candidate could not be built or run: its trial fails, the study goes on."""


class _Objective:
    def __init__(self, optuna: ModuleType, ev: _Evaluator, trials: int):
        self.optuna, self.ev, self.trials = optuna, ev, trials
        self.failures = 0

    def __call__(self, trial: Any) -> tuple[float, float]:
        optuna, ev, study = self.optuna, self.ev, trial.study
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        # Trial numbers are handed out in order by the storage: the ones before this trial that
        # completed or still run are the study's count, whichever worker runs them.
        before = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        if len(before) >= self.trials:
            trial.set_user_attr("over_budget", True)
            study.stop()
            raise optuna.TrialPruned("the study has all its trials")
        indices = {k.key: trial.suggest_int(k.key, 0, len(k.choices) - 1) for k in ev.space.knobs}
        values = ev.space.values(indices)
        key = ev.space.choice_key(values)
        trial.set_user_attr("choice", key)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        twin = next(
            (
                t
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("choice") == key and "duplicate_of" not in t.user_attrs
            ),
            None,
        )
        if twin is not None:  # the sampler proposed a candidate the study has: reuse its numbers
            for k, v in twin.user_attrs.items():
                if k not in ("worker", "seconds", "seeded", "choice"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("duplicate_of", twin.number)
            _set_constraints(optuna, trial, twin.user_attrs["constraints"])
            return tuple(twin.values)  # type: ignore[return-value]
        t0 = time.perf_counter()
        try:
            res = ev.measure(ev.build(values))
        except Exception as e:  # noqa: BLE001 - a candidate a pass or ONNX Runtime cannot handle must not end the study
            self.failures += 1
            why = (str(e).splitlines() or [type(e).__name__])[0][:500]
            trial.set_user_attr("error", why)
            log.warning("trial %d failed: %s", trial.number, why)
            if self.failures > max(10, self.trials):
                study.stop()
            raise CandidateFailed(why) from e
        res["seconds"] = round(time.perf_counter() - t0, 3)
        for k, v in res.items():
            trial.set_user_attr(k, v)
        _set_constraints(optuna, trial, res["constraints"])
        return res["drop_points"], ev.cost(res)


def _optimize(
    optuna: ModuleType,
    setup: _Setup,
    study: Any,
    space: Space,
    doc: dict[str, Any],
    progress: bool,
    *,
    waiting_only: bool = False,
) -> None:
    """Run trials until the study has ``trials`` complete ones (or, ``waiting_only``, run the
    enqueued seeds: the process that made the space runs them before workers start, because
    SQLite cannot lock a waiting trial against two workers taking it)."""
    from tqdm import tqdm

    ev = _Evaluator(setup, space, doc["baseline"])
    objective = _Objective(optuna, ev, setup.opts.trials)
    states = optuna.trial.TrialState
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state == states.COMPLETE)
    if not space.knobs:
        log.warning("no knob value stays within the budget on its own: nothing to search")
        return
    if done >= setup.opts.trials:
        return
    n_trials = None
    if waiting_only:
        n_trials = sum(1 for t in study.get_trials(deepcopy=False) if t.state == states.WAITING)
        if not n_trials:
            return
    bar = tqdm(total=setup.opts.trials, initial=done, desc="search", unit="trial", disable=not progress)

    def tick(study: Any, trial: Any) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)

    try:
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=setup.opts.timeout,
            catch=(CandidateFailed,),
            callbacks=[optuna.study.MaxTrialsCallback(setup.opts.trials), tick],
        )
    finally:
        bar.close()


def _worker_main(
    src: str, opts: SearchOptions, workdir: str, url: str, name: str, index: int, barrier: Any, level: int
) -> None:
    """A worker process of ``--workers``: rebuild the setup, wait for the others, run trials."""
    logging.basicConfig(level=level, format="graphslim: %(levelname)s: %(message)s")
    import graphslim.passes  # noqa: F401 - registers the passes in this process

    optuna = require_optuna()
    setup = _setup(Path(src), opts, Path(workdir))
    study = _open_study(optuna, setup, url, name, create=False, worker=index)
    space, doc = _prepare(optuna, setup, study, False)
    if barrier is not None:
        barrier.wait()
    _optimize(optuna, setup, study, space, doc, False)


def _run_workers(setup: _Setup, url: str, name: str) -> None:
    import multiprocessing

    n = setup.opts.workers
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(n)
    level = logging.getLogger().getEffectiveLevel()
    procs = [
        mp.Process(
            target=_worker_main,
            args=(str(setup.src), setup.opts, str(setup.workdir), url, name, i, barrier, level),
            name=f"graphslim-search-{i}",
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:  # only the workers this call started
            if p.is_alive():
                p.terminate()
                p.join(10)
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise GraphslimError(
            f"{len(bad)} of {n} search workers failed (exit codes {bad}); the study keeps their trials"
        )


# --------------------------------------------------------------------------- the result


def pareto_front(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows no other row beats or equals on every key (all minimized) while beating on one;
    among equal rows, the first."""
    front = []
    for i, r in enumerate(rows):
        dominated = False
        for j, o in enumerate(rows):
            if i == j:
                continue
            le = all(o[k] <= r[k] for k in keys)
            lt = any(o[k] < r[k] for k in keys)
            if (le and lt) or (j < i and all(o[k] == r[k] for k in keys)):
                dominated = True
                break
        if not dominated:
            front.append(r)
    return front


@dataclass
class SearchResult:
    """What :func:`search` returns: the chosen model, its report (with the ``search`` section),
    the output folder and the recipe written there (recipe.json)."""

    model: onnx.ModelProto
    report: dict[str, Any]
    out_dir: Path
    recipe: dict[str, Any]


def _recipe(pipe: Pipeline, setup: _Setup) -> dict[str, Any]:
    """The chosen pipeline as a recipe (only options that differ from their defaults) and the
    command that turns it into the same model."""
    items = []
    for p in pipe:
        opts = {}
        for f in fields(p.options):
            v = getattr(p.options, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            if v != default:
                opts[f.name] = list(v) if isinstance(v, tuple) else v
        items.append({"name": p.name, "options": opts} if opts else p.name)
    run = setup.opts.run
    flags = []
    for flag, value in (("--data", run.data), ("--train-data", run.train_data), ("--eval-data", run.eval_data)):
        if value is not None:
            flags.append(f"{flag} {value if isinstance(value, str | os.PathLike) else '<in-memory data>'}")
    if run.eval_fraction != 0.2:
        flags.append(f"(eval_fraction={run.eval_fraction})")
    needs_data = any(p.name == "quantize-int8" or getattr(p.options, "criterion", "") == "activation" for p in pipe)
    command = " ".join(["graphslim optimize", str(setup.src), "--recipe recipe.json", *flags, f"--seed {run.seed}"])
    return {
        "passes": items,
        "pipeline": str(pipe),
        "needs_training_data": needs_data,
        "reproduce": command,
        "note": "graphslim search wrote this; the model depends on the pipeline, the seed and the training data",
    }


def _row(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    return {
        "trial": t.number,
        "accuracy": a["metric"],
        "drop_points": a["drop_points"],
        "bytes": a["bytes"],
        "macs": a["macs"],
        "params": a["params"],
        "latency_ms": a.get("latency_ms"),
        "latency_source": "estimate" if a.get("latency_ms") is not None else "not measured",
        "within_budget": all(c <= 0 for c in a["constraints"]),
        "pipeline": a["pipeline"],
        "sha256": a.get("sha256"),
        "cost": t.values[1],
    }


def _finish(
    optuna: ModuleType, setup: _Setup, study: Any, doc: dict[str, Any], out: Path, t_start: float
) -> SearchResult:
    """Pick the winner among the finished trials (timing the best candidates end to end), and write
    it with ``optimize`` together with the report's search section and recipe.json."""
    opts = setup.opts
    space = Space.from_dict(doc["space"])
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    unique = [_row(t) for t in complete if "duplicate_of" not in t.user_attrs]
    base = doc["baseline"]
    baseline = _baseline_row(base, space, opts)
    # The candidates within the budgets, best (estimated) first: the first `validate` of them are
    # timed end to end, interleaved with the original, since estimates miss what happens between
    # layers (QDQ transitions, fusions) and drift with the machine's load.
    feasible = sorted(
        (r for r in unique if r["within_budget"]), key=lambda r: (r["cost"], r["drop_points"], r["trial"])
    )
    ev = _Evaluator(setup, space, base)
    validated = feasible[: opts.validate]
    if validated:
        _measure(setup, ev, study, validated, baseline)
    front = pareto_front([*unique, baseline], ("drop_points", "cost"))
    chosen = _choose(opts.objective, validated, feasible, baseline)
    if chosen is baseline:
        log.warning("no searched candidate beat the original within the budgets: writing the canonicalized model")
    pipe = Pipeline.parse(chosen["pipeline"])
    recipe = _recipe(pipe, setup)
    failed = sum(1 for t in trials if t.state == states.FAIL)
    section = _search_section(setup, study, doc, space, failed, complete, unique, front, chosen, baseline, validated)
    section["recipe"] = "recipe.json"
    section["reproduce"] = recipe["reproduce"]
    section["seconds"] = round(time.perf_counter() - t_start, 1)
    run = RunOptions.build(opts.run, pipeline=pipe)
    res: OptimizeResult = optimize(
        setup.src,
        out,
        run,
        report_extra={"search": section},
        extra_files={"recipe.json": (json.dumps(recipe, indent=2) + "\n").encode()},
    )
    if chosen.get("sha256") and res.report["output"]["sha256"] != chosen["sha256"]:
        log.warning(
            "optimize rebuilt the chosen recipe into a model that differs from the trial's (trial %s)", chosen["trial"]
        )
    return SearchResult(res.model, res.report, out, recipe)


def _baseline_row(base: dict[str, Any], space: Space, opts: SearchOptions) -> dict[str, Any]:
    """The original (canonicalized) model as a row like the trials', for the front and the choice."""
    baseline = {
        "trial": None,
        "accuracy": base["metric"],
        "drop_points": base["drop_points"],
        "bytes": base["bytes"],
        "macs": base["macs"],
        "params": base["params"],
        "latency_ms": base.get("latency_ms"),
        "latency_source": "measured" if base.get("latency_ms") is not None else "not measured",
        "within_budget": base["drop_points"] <= _max_drop(opts),
        "pipeline": space.prefix,
        "sha256": None,
    }
    cost_key = {"latency": "latency_ms", "bytes": "bytes", "macs": "macs"}[opts.objective]
    baseline["cost"] = baseline[cost_key] if baseline[cost_key] is not None else float("inf")
    return baseline


def _measure(
    setup: _Setup, ev: _Evaluator, study: Any, validated: list[dict[str, Any]], baseline: dict[str, Any]
) -> None:
    """Time the validated candidates end to end, interleaved with the original; their rows (and the
    baseline's) get measured latencies, and measured costs where the objective is latency."""
    opts = setup.opts
    built = {r["trial"]: _rebuild(ev, study, r["trial"]) for r in validated}
    timing = _timing(opts)
    calls = [timing.runner(setup.canonical, setup.sample)]
    calls += [timing.runner(built[r["trial"]].model, setup.sample) for r in validated]
    times = timing.interleaved(calls)
    baseline["latency_ms"], baseline["latency_source"] = times[0], "measured"
    for r, ms in zip(validated, times[1:], strict=True):
        if r["latency_ms"] is not None:
            r["latency_estimate_ms"] = r["latency_ms"]
        r["latency_ms"], r["latency_source"] = ms, "measured"
    if opts.objective == "latency":
        baseline["cost"] = times[0]
        for r in validated:
            r["cost"] = r["latency_ms"]


def _choose(
    objective: str, validated: list[dict[str, Any]], feasible: list[dict[str, Any]], baseline: dict[str, Any]
) -> dict[str, Any]:
    """The fastest measured candidate (latency), else the cheapest feasible one, else the original."""
    if objective == "latency" and validated:
        pool = validated + ([baseline] if baseline["within_budget"] else [])
        return min(
            pool, key=lambda r: (r["latency_ms"], r["drop_points"], r["trial"] if r["trial"] is not None else -1)
        )
    if feasible:
        return feasible[0]
    return baseline


def _search_section(
    setup: _Setup,
    study: Any,
    doc: dict[str, Any],
    space: Space,
    failed: int,
    complete: list[Any],
    unique: list[dict[str, Any]],
    front: list[dict[str, Any]],
    chosen: dict[str, Any],
    baseline: dict[str, Any],
    validated: list[dict[str, Any]],
) -> dict[str, Any]:
    """The report's ``search`` section, up to the recipe and timing keys the caller adds."""
    opts = setup.opts
    all_rows = [_row(t) for t in complete]
    return {
        "objective": opts.objective,
        "runtime": _timing(opts).label,
        "metric": {
            "name": setup.judge.kind,
            "description": setup.judge.name,
            "reference": setup.judge.reference,
            "samples": len(setup.judge.data),
        },
        "max_accuracy_drop": _max_drop(opts),
        "study": {
            "name": study.study_name,
            "storage": _safe_url(opts.storage or ""),
            "sampler": opts.sampler,
            "seed": opts.run.seed,
            "workers": opts.workers,
        },
        "trials": len(complete),
        "evaluations": len(unique),
        "duplicates": len(complete) - len(unique),
        "failed": failed,
        "seeded": sum(1 for t in complete if t.user_attrs.get("seeded")),
        "workers_seen": sorted({t.user_attrs.get("worker", "?") for t in complete}),
        "sensitivity": doc["sensitivity"],
        "knobs": {
            "kept": doc["space"]["knobs"],
            "discovered": len(doc["all_knobs"]),
            "left_out_by_sensitivity": sorted(
                {k["kind"] + ":" + k["name"] for k in doc["all_knobs"]} - {k.key for k in space.knobs}
            ),
        },
        "latency_table": _table_section(setup, doc["baseline"]),
        "front": [_public(r) for r in sorted(front, key=lambda r: r["cost"])],
        "history": [[r["trial"], r["accuracy"], r["drop_points"], r["cost"], r["within_budget"]] for r in all_rows],
        "chosen": {**_public(chosen), "why": _why(opts.objective, chosen, baseline)},
        "validated": [
            {"trial": r["trial"], "latency_ms": r["latency_ms"], "latency_estimate_ms": r.get("latency_estimate_ms")}
            for r in validated
        ],
    }


def _why(objective: str, chosen: dict[str, Any], baseline: dict[str, Any]) -> str:
    if chosen is baseline:
        return "no candidate within the budgets beat the original"
    if objective == "latency":
        return "fastest end-to-end measured latency among the validated Pareto candidates within the budgets"
    return f"smallest {objective} among the Pareto candidates within the budgets"


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "cost"}


def _table_section(setup: _Setup, base: dict[str, Any]) -> dict[str, Any] | None:
    t = setup.table
    if t is None:
        return None
    return {
        "file": t.path.name if t.path else None,
        "runtime": t.runtime,
        "entries": len(t.entries),
        "timed_by_this_process": t.timed,
        "original_ms": base.get("latency_ms"),
        "original_layers_ms": base.get("layers_ms"),
        "original_overhead_ms": base.get("overhead_ms"),
        "estimate": (
            "empty call + (original end to end - empty call) x candidate's layers' sum / original's "
            "(layers timed alone)"
            if "overhead_ms" in base
            else "original end to end - its layers' sum + the candidate's layers' sum (layers timed alone)"
        ),
    }


def _rebuild(ev: _Evaluator, study: Any, number: int) -> _Candidate:
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return ev.build(ev.space.values({k: int(v) for k, v in t.params.items()}))


def search(
    model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: SearchOptions | None = None
) -> SearchResult:
    """Search the knobs that apply to the model for the fastest (``objective``) model within the
    budgets, and write it to ``out_dir`` as ``optimize`` would, with ``recipe.json`` and a
    ``search`` section in the report. See the module docstring."""
    t_start = time.perf_counter()
    opts = options or SearchOptions()
    optuna = require_optuna()
    _timing(opts)  # bad timing options are usage errors before any work
    src, out = Path(model_path), Path(out_dir)
    reads = [
        src,
        *(d for d in (opts.run.data, opts.run.train_data, opts.run.eval_data) if isinstance(d, str | os.PathLike)),
    ]
    check_out_dir(out, "optimize", inputs=reads, force=opts.run.force)  # before any trial; optimize checks again
    workdir = out.absolute().parent / (out.name + ".search")
    url = opts.storage or f"sqlite:///{workdir / 'study.db'}"
    opts = replace(opts, storage=url)
    setup = _setup(src, opts, workdir)
    name = opts.study or _default_study(setup.settings)
    study = _open_study(optuna, setup, url, name, create=not opts.resume)
    space, doc = _prepare(optuna, setup, study, opts.run.progress)
    if opts.workers > 1:
        _optimize(optuna, setup, study, space, doc, opts.run.progress, waiting_only=True)
        _run_workers(setup, url, name)
    else:
        _optimize(optuna, setup, study, space, doc, opts.run.progress)
    return _finish(optuna, setup, study, doc, out, t_start)
