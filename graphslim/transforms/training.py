"""Knowledge-distillation fine-tuning of an ONNX student on onnxruntime-training's on-device API.

Loss (Hinton et al. 2015): ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_t || p_s)``
with ``p = softmax(logits / T)``. The teacher's softened probabilities are computed once per data
set with an InferenceSession and fed as an input (1.4-2.3x faster per epoch here than running the
teacher inside the training graph). The graph computes the KL term as the cross-entropy
``-sum p_t log p_s``: the teacher's entropy is a constant, added back when the loss is reported.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphslim.core.data import Dataset
from graphslim.core.fs import scratch_dir
from graphslim.core.ir import MAX_IR_VERSION, Graph
from graphslim.core.ops import op_info, trainable_inputs
from graphslim.core.runtime import require_training

__all__ = ["DistillOptions", "DistillResult", "distill_graph", "softmax", "trainable_parameters"]

log = logging.getLogger(__name__)

TEACHER_INPUT = "graphslim_teacher_probs"
LABELS_INPUT = "graphslim_labels"


class DistillOptions(Protocol):
    """What distill_graph reads: the distill pass's Options satisfy it."""

    epochs: int
    lr: float
    batch_size: int
    temperature: float
    alpha: float
    optimizer: str
    patience: int


@dataclass
class DistillResult:
    metric: str  # "accuracy" with labels, else "teacher_agreement"
    before: float
    after: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    trainable: int = 0
    masked: int = 0


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


def _kd_loss_block(onnxblock: Any, temperature: float, alpha: float, with_labels: bool) -> Any:
    class KDLoss(onnxblock.Block):
        """alpha * CE + (1 - alpha) * T^2 * (-sum p_t log softmax(s / T)), batch mean."""

        def build(self, logits: str, *_: str) -> str:
            g = self.base.graph
            out_vi = next(o for o in g.output if o.name == logits)
            tp = onnx.ValueInfoProto()
            tp.CopyFrom(out_vi)
            tp.name = TEACHER_INPUT
            g.input.append(tp)

            def const(name: str, value: Any, dtype: int = TensorProto.FLOAT, dims: tuple = ()) -> str:
                vals = value if isinstance(value, list) else [value]
                g.node.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [name],
                        name=name,
                        value=helper.make_tensor(name + "_v", dtype, list(dims), vals),
                    )
                )
                return name

            nodes = [
                helper.make_node("Div", [logits, const("gs_kd_T", temperature)], ["gs_kd_scaled"], name="gs_kd_div"),
                helper.make_node("LogSoftmax", ["gs_kd_scaled"], ["gs_kd_logp"], name="gs_kd_logsoftmax", axis=-1),
                helper.make_node("Mul", [TEACHER_INPUT, "gs_kd_logp"], ["gs_kd_prod"], name="gs_kd_mul"),
                helper.make_node(
                    "ReduceSum",
                    ["gs_kd_prod", const("gs_kd_axes", [-1], TensorProto.INT64, (1,))],
                    ["gs_kd_rowsum"],
                    name="gs_kd_sum",
                    keepdims=0,
                ),
                helper.make_node("ReduceMean", ["gs_kd_rowsum"], ["gs_kd_mean"], name="gs_kd_mean", keepdims=0),
                helper.make_node(
                    "Mul",
                    ["gs_kd_mean", const("gs_kd_coef", -(1.0 - alpha) * temperature**2)],
                    ["gs_kd_loss"],
                    name="gs_kd_scale",
                ),
            ]
            g.node.extend(nodes)
            if not with_labels:
                return "gs_kd_loss"
            lbl = onnx.ValueInfoProto()
            lbl.CopyFrom(out_vi)
            lbl.name = LABELS_INPUT
            lbl.type.tensor_type.elem_type = TensorProto.INT64
            del lbl.type.tensor_type.shape.dim[-1]
            g.input.append(lbl)
            g.node.extend(
                [
                    helper.make_node(
                        "SoftmaxCrossEntropyLoss",
                        [logits, LABELS_INPUT],
                        ["gs_ce", "gs_ce_logprob"],
                        name="gs_ce",
                        reduction="mean",
                    ),
                    helper.make_node("Mul", ["gs_ce", const("gs_alpha", alpha)], ["gs_ce_w"], name="gs_ce_w"),
                    helper.make_node("Add", ["gs_ce_w", "gs_kd_loss"], ["gs_total_loss"], name="gs_total"),
                ]
            )
            return "gs_total_loss"

    return KDLoss()


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


def distill_graph(
    graph: Graph,
    teacher: onnx.ModelProto,
    train: Dataset,
    evalset: Dataset,
    cfg: DistillOptions,
    *,
    seed: int = 0,
    progress: bool = False,
) -> DistillResult:
    """Fine-tune ``graph``'s float parameters against ``teacher``; writes the best weights back."""
    ort_training = require_training()
    from onnxruntime.training import api, artifacts

    from graphslim.core.runtime import run_model

    student = graph.to_model()
    student.ir_version = min(student.ir_version, MAX_IR_VERSION)
    logits_name = student.graph.output[0].name
    trainable, frozen, masks = trainable_parameters(graph)
    if not trainable:
        raise ValueError("the model has no float weights to train")
    t = cfg.temperature
    with_labels = train.labels is not None and evalset.labels is not None and cfg.alpha > 0
    alpha = cfg.alpha if with_labels else 0.0
    teacher_train = run_model(teacher, train)[0]
    teacher_eval = run_model(teacher, evalset)[0]
    if teacher_train.ndim != 2 or teacher_train.shape[1] != run_model(student, train.take(2))[0].shape[1]:
        raise ValueError("teacher and student must both output (N, classes) logits as their first output")
    p_train, p_eval = softmax(teacher_train, t), softmax(teacher_eval, t)
    # The KL term's constant: T^2 * (1 - alpha) * mean(sum p log p), per data set.
    ent = {
        id(train): float(np.mean(np.sum(p_train * np.log(np.maximum(p_train, 1e-30)), axis=1))),
        id(evalset): float(np.mean(np.sum(p_eval * np.log(np.maximum(p_eval, 1e-30)), axis=1))),
    }

    with scratch_dir("distill") as tmpd:
        block = _kd_loss_block(ort_training.onnxblock, t, alpha, with_labels)
        optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[cfg.optimizer]
        with _native_info_filtered():
            artifacts.generate_artifacts(
                student,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=block,
                optimizer=optim,
                artifact_directory=tmpd,
                additional_output_names=[logits_name],
            )
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            _resave(tmpd / name)
        state = api.CheckpointState.load_checkpoint(str(tmpd / "checkpoint"))
        module = api.Module(str(tmpd / "training_model.onnx"), state, str(tmpd / "eval_model.onnx"))
        optimizer = api.Optimizer(str(tmpd / "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(cfg.lr)
        names = module.input_names()

        def feeds(batch: Dataset, probs: np.ndarray) -> list[np.ndarray]:
            out = []
            for n in names:
                if n == TEACHER_INPUT:
                    out.append(probs)
                elif n == LABELS_INPUT:
                    out.append(batch.labels.astype(np.int64))
                else:
                    out.append(batch.inputs[n])
            return out

        def evaluate(data: Dataset, probs: np.ndarray, teacher_logits: np.ndarray) -> tuple[float, float]:
            module.eval()
            losses, hits, n = [], 0, 0
            for idx, batch in data.index_batches(256):
                loss, logits = module(*feeds(batch, probs[idx]))
                losses.append(float(loss) * len(idx))
                ref = batch.labels if with_labels else np.argmax(teacher_logits[idx], 1)
                hits += int(np.sum(np.argmax(logits, 1) == ref))
                n += len(idx)
            # Graph loss + the teacher-entropy constant = alpha * CE + (1 - alpha) * T^2 * KL.
            return float(np.sum(losses) / n) + (1.0 - alpha) * t * t * ent[id(data)], hits / n

        metric = "accuracy" if with_labels else "teacher_agreement"
        loss0, before = evaluate(evalset, p_eval, teacher_eval)
        best, best_epoch, stale = before, 0, 0
        best_params = {n: state.parameters[n].data.copy() for n in trainable}
        history = [{"epoch": 0, "eval_loss": round(loss0, 6), f"eval_{metric}": round(before, 6)}]
        times = []
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        bar = (
            tqdm(total=cfg.epochs, desc="distill", unit="epoch", disable=not progress or tqdm is None, leave=False)
            if tqdm
            else None
        )
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            module.train()
            train_losses = []
            for idx, batch in train.index_batches(cfg.batch_size, shuffle=True, seed=seed * 100003 + epoch):
                loss, _ = module(*feeds(batch, p_train[idx]))
                optimizer.step()
                module.lazy_reset_grad()
                for name, mask in masks.items():
                    param = state.parameters[name]
                    param.data = param.data * mask
                train_losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            loss_e, score = evaluate(evalset, p_eval, teacher_eval)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": round(float(np.mean(train_losses)) + (1.0 - alpha) * t * t * ent[id(train)], 6),
                    "eval_loss": round(loss_e, 6),
                    f"eval_{metric}": round(score, 6),
                    "seconds": round(times[-1], 4),
                }
            )
            if bar is not None:
                bar.set_postfix(loss=f"{loss_e:.4f}", **{metric: f"{score:.4f}"})
                bar.update(1)
            log.info("distill epoch %d: eval loss %.4f, %s %.4f", epoch, loss_e, metric, score)
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_params = {n: state.parameters[n].data.copy() for n in trainable}
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if bar is not None:
            bar.close()
    by_name = graph.tensors()
    for name, value in best_params.items():
        graph.set_tensor_value(by_name[name], value)
    return DistillResult(
        metric, before, best, best_epoch, history, float(np.median(times)) if times else 0.0, len(trainable), len(masks)
    )
