"""distill: knowledge-distillation fine-tune of the compressed model (the student) against the
model as it was before the pipeline started (the teacher, or ``teacher=path.onnx``).

Loss (``loss``, see graphslim/transforms/training.py): ``kl`` on (N, classes) logits,
``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``
(Hinton et al. 2015; without labels alpha = 0); ``cosine`` on hidden states or embeddings
(between mask-pooled sentence embeddings when the model has an attention-mask input, per sample
otherwise); ``mse`` (scale-free, over the tokens the mask keeps); ``auto`` picks kl for logits,
mse for hidden states and cosine for embeddings. ``layers=[...]`` also matches the hidden states of named nodes (or tensors) of student and
teacher, with a learned projection where pruning made the student narrower, weighted by
``layer_weight``. Unlabelled data is enough: ``--data`` with only the model inputs (e.g.
``input_ids`` and ``attention_mask``).

Runs on onnxruntime-training's on-device API (``pip install graphslim[training]``), directly on the
ONNX graph: no PyTorch model is needed. Trains on ``--data`` (or ``--train-data``), evaluates each
epoch with the model's metric (:mod:`graphslim.core.metrics`) on a seeded ``eval_fraction`` held
out of that training data (the report's own evaluation set is never seen), stops early after
``patience`` epochs without improvement, and keeps the best epoch (never worse than the untrained
student on the eval set).

Only float weights train. The structure is fixed (pruned channels stay pruned), exact zeros in
weights stay zero (the mask is re-applied after every step, so sparsify-blocks' empty blocks stay
empty), and BatchNormalization trains gamma and beta with its statistics frozen.

Cannot run (the model is left as it was, the reason goes to the report and stderr, and the CLI
exits 4): quantized graphs (QDQ with per-channel scales do not train on this stack: run
quantize-int8 / quantize-binary after distill), BatchNormalization in training mode, ``loss=kl``
on an output that is not logits, student and teacher outputs of different shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx

from graphslim.core.errors import InputError
from graphslim.core.ir import Graph, load_model
from graphslim.pipeline import Pass, PassContext, PassResult, Skip, register_pass
from graphslim.transforms.training import distill_graph


@register_pass
class Distill(Pass):
    name = "distill"
    exact = False

    @dataclass(frozen=True)
    class Options:
        epochs: int = 3
        lr: float = 1e-3
        batch_size: int = 64
        temperature: float = 4.0
        alpha: float = 0.5
        optimizer: Literal["adamw", "sgd"] = "adamw"
        patience: int = 2
        teacher: str = ""
        eval_fraction: float = 0.2
        loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
        layers: tuple[str, ...] = ()
        layer_weight: float = 1.0

        def __post_init__(self) -> None:
            if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
                raise ValueError("epochs, batch_size and patience must be >= 1")
            if self.lr <= 0 or self.temperature <= 0:
                raise ValueError("lr and temperature must be > 0")
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError("alpha must be in [0, 1]")
            if not 0.0 < self.eval_fraction < 1.0:
                raise ValueError("eval_fraction must be in (0, 1)")
            if self.layer_weight < 0:
                raise ValueError("layer_weight must be >= 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        why = self._why_not(graph)
        if why:
            return PassResult(changed=False, stats={}, skipped=[Skip("model", why)], not_run=why)
        teacher = self._teacher(ctx)
        if ctx.data is None:
            raise InputError("distill trains on a data set: give --data (the model inputs alone are enough)")
        train, evalset = ctx.train_eval_split(o.eval_fraction)
        try:
            res = distill_graph(
                graph, teacher, train, evalset, o, seed=ctx.seed, progress=ctx.progress, metric=ctx.metric
            )
        except ValueError as e:
            return PassResult(changed=False, stats={}, skipped=[Skip("model", str(e))], not_run=str(e))
        stats = {
            "loss": res.loss,
            "metric": res.metric,
            "before": round(res.before, 6),
            "after": round(res.after, 6),
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history) - 1,
            "seconds_per_epoch": round(res.seconds_per_epoch, 4),
            "trainable_tensors": res.trainable,
            "masked_tensors": res.masked,
            "train_samples": len(train),
            "eval_samples": len(evalset),
            "history": res.history,
        }
        if res.layers:
            stats["layers"] = res.layers
        return PassResult(changed=res.best_epoch > 0, stats=stats)

    @staticmethod
    def _why_not(graph: Graph) -> str | None:
        ops = {n.op for n in graph.nodes}
        if ops & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
            return "the model is quantized; put quantize-int8 / quantize-binary after distill"
        if any(n.op == "BatchNormalization" and n.attrs.get("training_mode", 0) for n in graph.nodes):
            return "BatchNormalization in training mode"
        return None

    def _teacher(self, ctx: PassContext) -> onnx.ModelProto:
        if self.options.teacher:
            return load_model(self.options.teacher)
        if ctx.teacher is None:
            raise InputError("distill needs a teacher: run it inside a pipeline, or give teacher=path.onnx")
        return ctx.teacher
