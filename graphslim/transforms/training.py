"""Knowledge-distillation fine-tuning of an ONNX student on onnxruntime-training's on-device API.

The loss matches the teacher on whatever the model outputs (``loss``):

* ``kl`` (logits, (N, classes)): ``alpha * CE(student, labels) + (1 - alpha) * T^2 *
  KL(p_t || p_s)`` with ``p = softmax(logits / T)`` (Hinton et al. 2015). The graph computes the
  KL term as the cross-entropy ``-sum p_t log p_s``: the teacher's entropy is a constant, added
  back when the loss is reported.
* ``cosine`` (hidden states, embeddings): ``1 - cos`` between student and teacher, computed the
  way :mod:`graphslim.core.metrics` judges the output: for [B, S, H] with an attention-mask
  input, between the mask-weighted means over S (sentence embeddings); otherwise per sample,
  over the flattened output.
* ``mse``: mean squared error divided by the teacher's mean square (scale-free), over the tokens
  the attention mask keeps when there is one.
* ``auto``: ``kl`` for (N, classes) logits, ``mse`` for hidden states (rank 3 and more: matching
  every token generalised better than matching the pooled embedding, measured on a BERT-like
  encoder with half its FFN pruned: held-out pooled cosine 0.9926 vs 0.9841), ``cosine`` for
  embeddings and other outputs.

Intermediate-layer matching (TinyBERT-style, ``layers``): the named tensors (or the first
outputs of the named nodes) become extra outputs of student and teacher, and
``layer_weight * mean_l MSE(h_s,l P_l, h_t,l) / mean(h_t,l^2)`` joins the loss, masked by the
attention mask. Where pruning left the student narrower than the teacher, ``P_l`` is a learned
[H_s, H_t] projection initialised by least squares on the training data; where widths agree,
``P_l`` is the identity (no parameter). The projections are not part of the result.

Teacher targets (softened probabilities, pooled embeddings, hidden states) are computed once per
data set with an InferenceSession and fed as inputs (1.4-2.3x faster per epoch here than running
the teacher inside the training graph). Unlabelled data is enough: the teacher is the model
before compression.

Facts of this stack that shape the code (see ../shared/NOTES-ENV.md): every artifact is saved with
IR version <= 10; SoftmaxCrossEntropyLoss declares both outputs; BatchNormalization trains in
inference mode with its statistics frozen; QDQ graphs with per-channel scales do not train, so
quantize after distilling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphslim.core.data import Dataset
from graphslim.core.fs import scratch_dir
from graphslim.core.ir import MAX_IR_VERSION, Graph
from graphslim.core.metrics import Evaluator, find_mask_input, input_array, input_names, masked_mean
from graphslim.core.ops import op_info, trainable_inputs
from graphslim.core.runtime import require_training

__all__ = [
    "LOSSES",
    "DistillOptions",
    "DistillResult",
    "distill_graph",
    "softmax",
    "trainable_parameters",
]

log = logging.getLogger(__name__)

LOSSES = ("auto", "kl", "mse", "cosine")
TEACHER_INPUT = "graphslim_teacher_probs"  # kl: softened teacher probabilities
TARGET_INPUT = "graphslim_teacher_target"  # cosine / mse: teacher output (pooled where masked cosine)
LABELS_INPUT = "graphslim_labels"
LAYER_INPUT = "graphslim_teacher_layer"  # + index: teacher hidden states of matched layers
PROJ_PARAM = "graphslim_projection"  # + index: learned projections (dropped after training)


class DistillOptions(Protocol):
    """What distill_graph reads: the distill pass's Options satisfy it."""

    epochs: int
    lr: float
    batch_size: int
    temperature: float
    alpha: float
    optimizer: str
    patience: int
    loss: str
    layers: tuple[str, ...]
    layer_weight: float


@dataclass
class DistillResult:
    metric: str  # graphslim.core.metrics name: accuracy, agreement, pooled_cosine, cosine, mse
    before: float
    after: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    trainable: int = 0
    masked: int = 0
    loss: str = "kl"
    layers: list[dict[str, Any]] = field(default_factory=list)


def softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / t
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def trainable_parameters(graph: Graph) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """(trainable, frozen, masks): float initializers that are weights, biases or per-channel
    parameters train; the rest (BatchNorm statistics, shapes, scales) is frozen. Weights with
    exact zeros get a mask that keeps those zeros (sparsify-blocks' blocks stay empty)."""
    from graphslim.core.ir import Constant

    trainable: dict[str, None] = {}
    frozen: dict[str, None] = {}
    masks: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, Constant) or not t.name:
                continue
            val = np.asarray(t.values)
            if val.dtype.kind == "f" and i in trainable_inputs(node) and val.ndim >= 1:
                trainable[t.name] = None
                info = op_info(node.op, node.domain)
                is_weight = info is not None and info.weight is not None and info.weight.index == i
                if is_weight and not np.all(val):
                    masks[t.name] = (val != 0).astype(val.dtype)
            else:
                frozen[t.name] = None
    frozen_names = [n for n in frozen if n not in trainable]
    return list(trainable), frozen_names, masks


# --------------------------------------------------------------------------- the loss graph


class _Nodes:
    """Appends nodes and constants to the loss block's graph with short unique names."""

    def __init__(self, g: onnx.GraphProto, opset: int):
        self.g, self.n, self.opset = g, 0, opset

    def const(self, value: Any, dtype: int = TensorProto.FLOAT) -> str:
        self.n += 1
        name = f"gs_c{self.n}"
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        self.g.node.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                name=name,
                value=helper.make_tensor(name + "_v", dtype, list(arr.shape), arr.ravel().tolist()),
            )
        )
        return name

    def op(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
        self.n += 1
        outs = [f"gs_{op.lower()}{self.n}_{i}" for i in range(n_out)]
        self.g.node.append(helper.make_node(op, list(inputs), outs, name=f"gs_{op.lower()}{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        # axes is an input from opset 13 for ReduceSum, from 18 for the other reductions
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            return self.op(op, [x, self.const(list(axes), TensorProto.INT64)], keepdims=keepdims)
        return self.op(op, [x], axes=list(axes), keepdims=keepdims)

    def add_input(self, name: str, elem: int, dims: Sequence[Any]) -> None:
        self.g.input.append(helper.make_tensor_value_info(name, elem, list(dims)))


@dataclass
class _LossPlan:
    kind: str  # kl | cosine | mse
    output: str  # the student output the loss reads
    rank: int
    mask: str | None  # attention-mask graph input, for pooling / token weights
    pooled: bool  # cosine between mask-pooled outputs
    temperature: float = 1.0
    alpha: float = 0.0
    with_labels: bool = False
    power: float = 1.0  # mse: teacher mean square
    layers: list[_LayerMatch] = field(default_factory=list)
    layer_weight: float = 1.0
    opset: int = 13


@dataclass
class _LayerMatch:
    student: str  # student tensor (extra graph output)
    teacher: str  # teacher tensor
    width_s: int
    width_t: int
    power: float  # teacher mean square over kept tokens
    projection: np.ndarray | None = None  # [H_s, H_t] initial value where widths differ
    index: int = 0


def _mask_weights(b: _Nodes, mask: str, rank: int) -> str:
    """[B, S, 1, ...] float weights from the [B, S] mask input."""
    w = b.op("Cast", [mask], to=TensorProto.FLOAT)
    return b.op("Unsqueeze", [w, b.const(list(range(2, rank)), TensorProto.INT64)])


def _pool(b: _Nodes, x: str, mask: str, rank: int) -> str:
    """Mask-weighted mean over axis 1 of [B, S, H...]."""
    w = _mask_weights(b, mask, rank)
    num = b.reduce("ReduceSum", b.op("Mul", [x, w]), [1], keepdims=0)
    den = b.op("Add", [b.reduce("ReduceSum", w, [1], keepdims=0), b.const(1e-9)])
    return b.op("Div", [num, den])


def _cosine_loss(b: _Nodes, s: str, t: str) -> str:
    """mean over rows of 1 - cos(s_row, t_row); s, t are [B, D] (flattened per sample)."""
    eps = b.const(1e-12)
    dot = b.reduce("ReduceSum", b.op("Mul", [s, t]), [-1], keepdims=0)
    ns = b.op("Sqrt", [b.op("Add", [b.reduce("ReduceSum", b.op("Mul", [s, s]), [-1], keepdims=0), eps])])
    nt = b.op("Sqrt", [b.op("Add", [b.reduce("ReduceSum", b.op("Mul", [t, t]), [-1], keepdims=0), eps])])
    cos = b.op("Div", [dot, b.op("Mul", [ns, nt])])
    return b.op("Sub", [b.const(1.0), b.reduce("ReduceMean", cos, [0], keepdims=0)])


def _flatten_rows(b: _Nodes, x: str) -> str:
    return b.op("Flatten", [x], axis=1)


def _masked_mse(b: _Nodes, s: str, t: str, mask: str | None, rank: int, factor: float) -> str:
    """``factor`` x the mean squared error over kept tokens (all elements without a mask).

    The factor scales the squared differences before the reduction: a sum of terms each divided
    by a constant is what ORT-training's ScaledSum fusion rewrites into a BatchScale gradient,
    which has no CPU kernel."""
    diff = b.op("Sub", [s, t])
    sq = b.op("Mul", [b.op("Mul", [diff, diff]), b.const(factor)])
    if mask is None or rank < 3:
        return b.reduce("ReduceMean", sq, list(range(rank)), keepdims=0)
    w = _mask_weights(b, mask, rank)
    total = b.reduce("ReduceSum", b.op("Mul", [sq, w]), list(range(rank)), keepdims=0)
    # elements per kept token: the product of the trailing dims, from the shape at run time
    trailing = b.op("Slice", [b.op("Shape", [s]), b.const([2], TensorProto.INT64), b.const([rank], TensorProto.INT64)])
    per = b.op("Cast", [b.reduce("ReduceProd", trailing, [0], keepdims=0)], to=TensorProto.FLOAT)
    kept = b.reduce("ReduceSum", w, list(range(rank)), keepdims=0)
    return b.op("Div", [total, b.op("Add", [b.op("Mul", [kept, per]), b.const(1e-9)])])


def _loss_block(onnxblock: Any, plan: _LossPlan) -> Any:
    class DistillLoss(onnxblock.Block):
        """See the module docstring; returns the scalar loss."""

        def build(self, *_: str) -> str:
            g = self.base.graph
            b = _Nodes(g, plan.opset)
            s = plan.output
            out_vi = next(o for o in g.output if o.name == s)
            if plan.kind == "kl":
                loss = self._kl(b, s, out_vi)
            else:
                tdims = ["N", out_vi.type.tensor_type.shape.dim[-1].dim_value or "H"] if plan.pooled else None
                if plan.pooled:
                    b.add_input(TARGET_INPUT, TensorProto.FLOAT, tdims)
                    loss = _cosine_loss(b, _pool(b, s, plan.mask, plan.rank), TARGET_INPUT)
                else:
                    tv = onnx.ValueInfoProto()
                    tv.CopyFrom(out_vi)
                    tv.name = TARGET_INPUT
                    g.input.append(tv)
                    if plan.kind == "cosine":
                        loss = _cosine_loss(b, _flatten_rows(b, s), _flatten_rows(b, TARGET_INPUT))
                    else:
                        loss = _masked_mse(b, s, TARGET_INPUT, plan.mask, plan.rank, 1.0 / max(plan.power, 1e-12))
            if plan.layers:
                loss = _add_layer_terms(b, g, plan, loss)
            return loss

        def _kl(self, b: _Nodes, logits: str, out_vi: onnx.ValueInfoProto) -> str:
            g = self.base.graph
            tp = onnx.ValueInfoProto()
            tp.CopyFrom(out_vi)
            tp.name = TEACHER_INPUT
            g.input.append(tp)
            t, alpha = plan.temperature, plan.alpha
            logp = b.op("LogSoftmax", [b.op("Div", [logits, b.const(t)])], axis=-1)
            rowsum = b.reduce("ReduceSum", b.op("Mul", [TEACHER_INPUT, logp]), [-1], keepdims=0)
            kd = b.op("Mul", [b.reduce("ReduceMean", rowsum, [0], keepdims=0), b.const(-(1.0 - alpha) * t**2)])
            if not plan.with_labels:
                return kd
            lbl = onnx.ValueInfoProto()
            lbl.CopyFrom(out_vi)
            lbl.name = LABELS_INPUT
            lbl.type.tensor_type.elem_type = TensorProto.INT64
            del lbl.type.tensor_type.shape.dim[-1]
            g.input.append(lbl)
            ce, _ = b.op("SoftmaxCrossEntropyLoss", [logits, LABELS_INPUT], n_out=2, reduction="mean")
            return b.op("Add", [b.op("Mul", [ce, b.const(alpha)]), kd])

    return DistillLoss()


def _add_layer_terms(b: _Nodes, g: onnx.GraphProto, plan: _LossPlan, loss: str) -> str:
    """``loss`` plus the matched layers' token MSE terms (through the learned projections, whose
    initial values become initializers of ``g``)."""
    terms = []
    for m in plan.layers:
        target = f"{LAYER_INPUT}{m.index}"
        b.add_input(target, TensorProto.FLOAT, ["N", "S", m.width_t])
        x = m.student
        if m.projection is not None:
            p = f"{PROJ_PARAM}{m.index}"
            g.initializer.append(numpy_helper.from_array(m.projection.astype(np.float32), p))
            x = b.op("MatMul", [x, p])
        factor = plan.layer_weight / len(plan.layers) / max(m.power, 1e-12)
        terms.append(_masked_mse(b, x, target, plan.mask, 3, factor))
    for t in terms:
        loss = b.op("Add", [loss, t])
    return loss


# --------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _native_info_filtered() -> Iterator[None]:
    """Drop onnxruntime-training's INFO lines from native stderr, forward everything else.

    Its gradient-graph builder logs every graph transformer at INFO through a logger that
    ``set_default_logger_severity`` does not reach.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if " [I:onnxruntime" not in line and " [V:onnxruntime" not in line:
                    print(line, file=sys.stderr)


def _resave(path: Path) -> None:
    """onnxruntime-training 1.19 loads IR <= 10 only; generated artifacts may carry newer IR."""
    m = onnx.load(str(path))
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
        onnx.save(m, str(path))


def _declare_saved_outputs(model: onnx.ModelProto) -> None:
    """LayerNormalization's gradient reads its optional Mean and InvStdDev outputs, which exports
    leave out: declare them in the training copy (the result graph is untouched)."""
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"gs_ln{i}_mean", f"gs_ln{i}_invstd"])


def _resolve_tensor(model: onnx.ModelProto, name: str) -> str | None:
    """A tensor name: ``name`` itself if some node writes it, else the first output of the node
    called ``name``."""
    for n in model.graph.node:
        if name in n.output:
            return name
    for n in model.graph.node:
        if n.name == name and n.output:
            return n.output[0]
    return None


def _with_outputs(
    model: onnx.ModelProto, names: Sequence[str], dims: Sequence[Sequence[Any]] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (with ``dims`` where given; the
    training graph's checker wants a shape, inference does not)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for i, n in enumerate(names):
        if n not in have:
            shape = list(dims[i]) if dims is not None else None
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))
    return m


def _run_outputs(model: onnx.ModelProto, data: Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    from graphslim.core.runtime import ort_session, run_model

    sess = ort_session(_with_outputs(model, names))
    outs = run_model(sess, data)
    by = {o.name: i for i, o in enumerate(sess.get_outputs())}
    return {n: outs[by[n]] for n in names}


def _token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[N, S, H] -> [kept tokens, H]."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[np.asarray(mask) != 0]


def _lstsq(xs: np.ndarray, xt: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """argmin_P |xs P - xt|^2 + ridge * |xs|^2 / H_s * |P|^2 (float64)."""
    a = xs.astype(np.float64)
    gram = a.T @ a
    lam = ridge * np.trace(gram) / max(gram.shape[0], 1)
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a.T @ xt.astype(np.float64))


# --------------------------------------------------------------------------- the job


@dataclass
class _DistillSetup:
    """What the training job needs, worked out from the teacher's outputs before it starts."""

    ev: Evaluator
    k: int  # index of the output the metric and the loss read
    out_name: str
    plan: _LossPlan
    targets: dict[str, tuple[np.ndarray, np.ndarray]]  # input name -> (train, eval)
    ent: dict[str, float]  # the KL term's constant per data set ("train", "eval")
    student: onnx.ModelProto  # with the matched layers' extra outputs
    trainable: list[str]  # the graph's trainable weights and the learned projections


@dataclass
class _Session:
    """The ORT training session built from the generated artifacts."""

    state: Any  # onnxruntime.training.api.CheckpointState
    module: Any  # onnxruntime.training.api.Module
    optimizer: Any  # onnxruntime.training.api.Optimizer
    names: list[str]  # the training graph's inputs, in order


@dataclass
class _TrainRun:
    """The training loop's outcome: scores, history and the best epoch's weights."""

    before: float
    best: float
    best_epoch: int
    history: list[dict[str, float]]
    times: list[float]
    weights: list[str]  # the graph's trained weights (no projections)
    best_params: dict[str, np.ndarray]


def distill_graph(
    graph: Graph,
    teacher: onnx.ModelProto,
    train: Dataset,
    evalset: Dataset,
    cfg: DistillOptions,
    *,
    seed: int = 0,
    progress: bool = False,
    metric: str = "auto",
) -> DistillResult:
    """Fine-tune ``graph``'s float parameters against ``teacher``; writes the best weights back.

    Raises ValueError (one line: why) where distillation cannot run on this model."""
    ort_training = require_training()
    student = graph.to_model()
    student.ir_version = min(student.ir_version, MAX_IR_VERSION)
    _declare_saved_outputs(student)
    trainable, frozen, masks = trainable_parameters(graph)
    if not trainable:
        raise ValueError("the model has no float weights to train")
    setup = _plan_distillation(graph, student, teacher, train, evalset, cfg, metric, trainable)
    with scratch_dir("distill") as tmpd:
        session = _training_session(ort_training, setup, frozen, cfg, tmpd, train)
        run = _train_epochs(session, setup, masks, train, evalset, cfg, seed=seed, progress=progress)
    by_name = graph.tensors()
    for name, value in run.best_params.items():
        graph.set_tensor_value(by_name[name], value)
    layers = [
        {
            "student": m.student,
            "teacher": m.teacher,
            "width_student": m.width_s,
            "width_teacher": m.width_t,
            "projection": "learned (least-squares init)" if m.projection is not None else "identity",
        }
        for m in setup.plan.layers
    ]
    return DistillResult(
        setup.ev.spec.name,
        run.before,
        run.best,
        run.best_epoch,
        run.history,
        float(np.median(run.times)) if run.times else 0.0,
        len(run.weights),
        len(masks),
        setup.plan.kind,
        layers,
    )


def _plan_distillation(
    graph: Graph,
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    train: Dataset,
    evalset: Dataset,
    cfg: DistillOptions,
    metric: str,
    trainable: list[str],
) -> _DistillSetup:
    """Run the teacher, choose the loss, and compute its targets (and the matched layers')."""
    from graphslim.core.runtime import run_model

    teacher_eval = run_model(teacher, evalset)
    ev = Evaluator(teacher, evalset, metric=metric, reference_outputs=teacher_eval)
    k = ev.spec.output
    out_name = student.graph.output[k].name
    teacher_train = run_model(teacher, train)[k]
    ref_eval = teacher_eval[k]
    student_probe = run_model(student, train.take(2))[k]
    if student_probe.shape[1:] != teacher_train.shape[1:]:
        raise ValueError(
            f"student output {out_name} has shape {student_probe.shape[1:]} per sample, the teacher's "
            f"{teacher_train.shape[1:]}: distillation matches outputs of the same shape"
        )
    logits = teacher_train.ndim == 2 and teacher_train.shape[1] > 1 and ev.spec.name in ("accuracy", "agreement")
    # Hidden states [B, S, H]: token-level MSE beat the pooled-cosine loss on held-out pooled cosine
    # in every setting tried (BERT-like, 50% FFN pruned: 0.9926 vs 0.9841); embeddings: cosine.
    kind = cfg.loss if cfg.loss != "auto" else ("kl" if logits else ("mse" if teacher_train.ndim >= 3 else "cosine"))
    if kind == "kl" and not logits:
        raise ValueError(
            f"loss=kl needs (N, classes) logits; output {out_name} has shape {teacher_train.shape[1:]} per sample: "
            "use loss=cosine or loss=mse"
        )
    if not np.issubdtype(teacher_train.dtype, np.floating):
        raise ValueError(f"output {out_name} is not a float tensor: nothing to distill")
    mask_name = find_mask_input(input_names(train))
    rank = teacher_train.ndim
    masks_of = {}
    if mask_name is not None and rank >= 3:
        masks_of = {"train": input_array(train, mask_name), "eval": input_array(evalset, mask_name)}
    mask_ok = bool(masks_of) and masks_of["train"].shape == teacher_train.shape[:2]
    plan = _LossPlan(
        kind,
        out_name,
        rank,
        mask_name if mask_ok else None,
        pooled=kind == "cosine" and mask_ok,
        temperature=cfg.temperature,
        opset=graph.opset,
    )
    targets, ent = _output_targets(plan, cfg, train, evalset, teacher_train, ref_eval, masks_of)
    if cfg.layers:
        mask_train = input_array(train, mask_name) if mask_name else None
        plan.layers, layer_targets = _match_layers(student, teacher, train, evalset, cfg.layers, mask_name, mask_train)
        targets.update(layer_targets)
        plan.layer_weight = cfg.layer_weight
        student = _with_outputs(student, [m.student for m in plan.layers], [["N", "S", m.width_s] for m in plan.layers])
        trainable = trainable + [f"{PROJ_PARAM}{m.index}" for m in plan.layers if m.projection is not None]
    return _DistillSetup(ev, k, out_name, plan, targets, ent, student, trainable)


def _output_targets(
    plan: _LossPlan,
    cfg: DistillOptions,
    train: Dataset,
    evalset: Dataset,
    teacher_train: np.ndarray,
    ref_eval: np.ndarray,
    masks_of: dict[str, np.ndarray],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """The output loss's teacher targets (input name -> (train, eval)) and the KL term's constant per
    data set; sets the plan's alpha/with_labels (kl) or power (mse)."""
    targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ent = {"train": 0.0, "eval": 0.0}
    if plan.kind == "kl":
        with_labels = train.labels is not None and evalset.labels is not None and cfg.alpha > 0
        plan.alpha, plan.with_labels = (cfg.alpha if with_labels else 0.0), with_labels
        t = cfg.temperature
        p_train, p_eval = softmax(teacher_train, t), softmax(ref_eval, t)
        targets[TEACHER_INPUT] = (p_train, p_eval)
        # The KL term's constant: T^2 * (1 - alpha) * mean(sum p log p), per data set.
        for key, p in (("train", p_train), ("eval", p_eval)):
            ent[key] = (1.0 - plan.alpha) * t * t * float(np.mean(np.sum(p * np.log(np.maximum(p, 1e-30)), axis=1)))
    elif plan.pooled:
        targets[TARGET_INPUT] = tuple(  # type: ignore[assignment]
            masked_mean(x, masks_of[w].astype(np.float64)).astype(np.float32)
            for x, w in ((teacher_train, "train"), (ref_eval, "eval"))
        )
    else:
        targets[TARGET_INPUT] = (teacher_train.astype(np.float32), ref_eval.astype(np.float32))
        if plan.kind == "mse":
            w = masks_of["train"] if plan.mask else None
            plan.power = (
                float(np.mean(_token_rows(teacher_train, w) ** 2))
                if plan.rank >= 3
                else float(np.mean(teacher_train**2))
            )
    return targets, ent


def _training_session(
    ort_training: Any, setup: _DistillSetup, frozen: list[str], cfg: DistillOptions, tmpd: Path, train: Dataset
) -> _Session:
    """Generate the training artifacts into ``tmpd`` and open a training session on them."""
    from onnxruntime.training import api, artifacts

    block = _loss_block(ort_training.onnxblock, setup.plan)
    optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[cfg.optimizer]
    with _native_info_filtered():
        artifacts.generate_artifacts(
            setup.student,
            requires_grad=setup.trainable,
            frozen_params=frozen,
            loss=block,
            optimizer=optim,
            artifact_directory=tmpd,
            additional_output_names=[setup.out_name],
        )
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        _resave(tmpd / name)
    state = api.CheckpointState.load_checkpoint(str(tmpd / "checkpoint"))
    module = api.Module(str(tmpd / "training_model.onnx"), state, str(tmpd / "eval_model.onnx"))
    optimizer = api.Optimizer(str(tmpd / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(cfg.lr)
    names = module.input_names()
    have = set(input_names(train))
    unknown = [n for n in names if n not in setup.targets and n != LABELS_INPUT and n not in have]
    if unknown:
        raise ValueError(f"the training graph wants inputs graphslim does not feed: {', '.join(unknown)}")
    return _Session(state, module, optimizer, names)


def _feeds(session: _Session, setup: _DistillSetup, batch: Dataset, idx: np.ndarray, which: int) -> list[np.ndarray]:
    """The training graph's inputs for one batch; ``which`` picks the targets (0 train, 1 eval)."""
    out = []
    for n in session.names:
        if n in setup.targets:
            out.append(setup.targets[n][which][idx])
        elif n == LABELS_INPUT:
            out.append(batch.labels.astype(np.int64))
        else:
            out.append(batch.inputs[n])
    return out


def _evaluate(session: _Session, setup: _DistillSetup, evalset: Dataset, cfg: DistillOptions) -> tuple[float, float]:
    """(eval loss, eval score) of the session's current weights."""
    session.module.eval()
    losses, outs = [], []
    for idx, batch in evalset.index_batches(max(cfg.batch_size, 64)):
        loss, out = session.module(*_feeds(session, setup, batch, idx, 1))
        losses.append(float(loss) * len(idx))
        outs.append(out)
    pred = [np.zeros(0)] * (setup.k + 1)
    pred[setup.k] = np.concatenate(outs)
    return float(np.sum(losses) / len(evalset)) + setup.ent["eval"], setup.ev.score_outputs(pred).value


def _train_epochs(
    session: _Session,
    setup: _DistillSetup,
    masks: dict[str, np.ndarray],
    train: Dataset,
    evalset: Dataset,
    cfg: DistillOptions,
    *,
    seed: int,
    progress: bool,
) -> _TrainRun:
    """Train epoch by epoch, keeping the best-scoring weights, until ``cfg.patience`` epochs bring
    no improvement or ``cfg.epochs`` have run."""
    state, module, optimizer = session.state, session.module, session.optimizer
    ev = setup.ev
    loss0, before = _evaluate(session, setup, evalset, cfg)
    best, best_epoch, stale = before, 0, 0
    weights = [n for n in setup.trainable if not n.startswith(PROJ_PARAM)]
    best_params = {n: state.parameters[n].data.copy() for n in weights}
    key = f"eval_{ev.spec.name}"
    history = [{"epoch": 0, "eval_loss": round(loss0, 6), key: round(before, 6)}]
    times = []
    from tqdm import tqdm

    bar = tqdm(total=cfg.epochs, desc=f"distill ({setup.plan.kind})", unit="epoch", disable=not progress, leave=False)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        module.train()
        train_losses = []
        for idx, batch in train.index_batches(cfg.batch_size, shuffle=True, seed=seed * 100003 + epoch):
            loss, _ = module(*_feeds(session, setup, batch, idx, 0))
            optimizer.step()
            module.lazy_reset_grad()
            for name, mask in masks.items():
                param = state.parameters[name]
                param.data = param.data * mask
            train_losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        loss_e, score = _evaluate(session, setup, evalset, cfg)
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(float(np.mean(train_losses)) + setup.ent["train"], 6),
                "eval_loss": round(loss_e, 6),
                key: round(score, 6),
                "seconds": round(times[-1], 4),
            }
        )
        bar.set_postfix(loss=f"{loss_e:.4f}", **{ev.spec.name: f"{score:.4f}"})
        bar.update(1)
        log.info("distill epoch %d: eval loss %.4f, %s %.4f", epoch, loss_e, ev.spec.name, score)
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_params = {n: state.parameters[n].data.copy() for n in weights}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    return _TrainRun(before, best, best_epoch, history, times, weights, best_params)


def _match_layers(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    train: Dataset,
    evalset: Dataset,
    layers: Sequence[str],
    mask_name: str | None,
    mask: np.ndarray | None,
) -> tuple[list[_LayerMatch], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Resolve layer names in both models, compute teacher targets and projection inits."""
    pairs = []
    for name in layers:
        s, t = _resolve_tensor(student, name), _resolve_tensor(teacher, name)
        if s is None or t is None:
            where = "student" if s is None else "teacher"
            raise ValueError(f"layers: no node or tensor named {name!r} in the {where}")
        pairs.append((s, t))
    t_train = _run_outputs(teacher, train, [t for _, t in pairs])
    t_eval = _run_outputs(teacher, evalset, [t for _, t in pairs])
    s_train = _run_outputs(student, train, [s for s, _ in pairs])
    matches, targets = [], {}
    for i, (s, t) in enumerate(pairs):
        hs, ht = s_train[s], t_train[t]
        if hs.ndim != 3 or ht.ndim != 3 or hs.shape[:2] != ht.shape[:2]:
            raise ValueError(
                f"layers: {s} is {hs.shape[1:]} per sample in the student and {ht.shape[1:]} in the teacher; "
                "matching needs [B, S, H] hidden states of the same length"
            )
        rows_t = _token_rows(ht, mask)
        proj = None
        if hs.shape[-1] != ht.shape[-1]:
            proj = _lstsq(_token_rows(hs, mask), rows_t).astype(np.float32)
        m = _LayerMatch(
            s, t, int(hs.shape[-1]), int(ht.shape[-1]), float(np.mean(rows_t.astype(np.float64) ** 2)), proj, i
        )
        matches.append(m)
        targets[f"{LAYER_INPUT}{i}"] = (ht.astype(np.float32), t_eval[t].astype(np.float32))
    return matches, targets
