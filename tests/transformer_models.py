"""Small transformer ONNX models for tests and benchmarks: Hugging Face exports and onnx.helper twins.

Two families, same four architectures (``KINDS``: BERT, ViT, GPT-2, Llama):

* ``export_hf(kind, ...)`` builds the model from a ``transformers`` config with seeded random
  weights and exports it with the TorchScript exporter (``torch.onnx.export(dynamo=False)``,
  opset 17, eager attention, symbolic batch and sequence). Needs torch and transformers; raises
  ImportError without them. Exports are cached per (kind, config, seed) in this process and,
  with ``cache_dir``, on disk.
* ``bert_like``, ``vit_like``, ``gpt2_like`` and ``llama_like`` write the same graphs with
  onnx.helper, so every test can use them without torch. They are node-for-node copies of what
  the exporter writes for transformers 5.24 / torch 2.13 (the test suite checks that the two
  graphs are the same DAG of ops, attributes and constants), including the parts a compressor
  has to see through: head reshapes whose target shape is computed at run time (Shape -> Gather
  -> Unsqueeze -> Concat), the 4-D additive mask built from ``attention_mask`` by indexing
  arithmetic (Range, Flatten, Gather, Where), the exporter's ``expand`` idiom (ConstantOfShape,
  Equal, Where, Expand), GPT-2's Conv1D as Reshape -> Gemm -> Reshape, Llama's RoPE, GQA repeat
  and RMSNorm written out in elementary ops. Pass ``weights=hf_weights(kind)`` to get the
  exported model's numbers as well.

``sample_inputs_for`` makes feeds for any of these models, ``pooled_cosine`` compares encoder
outputs, and ``hand_count`` gives parameter and MAC counts from the config alone (formulas in its
docstring), so a cost model can be checked against arithmetic done by hand.

What the exports look like (2 layers, hidden 64, 4 heads, opset 17), all verified by the tests:

* Attention, every kind: ``MatMul`` (+ ``Add`` bias, bias first) per projection; the
  [B, S, heads, head_dim] target shape is ``Concat(Unsqueeze(Gather(Shape(x), 0)),
  Unsqueeze(Gather(Shape(x), 1)), [-1], [head_dim])``, one Concat per projection;
  ``Transpose(0, 2, 1, 3)`` for Q and V; K gets one ``Transpose(0, 2, 3, 1)`` (BERT, ViT, GPT-2)
  or ``Transpose(0, 2, 1, 3)`` then ``Transpose(0, 1, 3, 2)`` after RoPE and GQA (Llama); the
  scale is ``Mul`` by head_dim**-0.5 after QK^T; the mask is ``Add``-ed; ``Softmax(axis=-1)``
  then 0 (BERT), 1 (GPT-2) or 2 (ViT, Llama) no-op ``Cast`` to float; ``Transpose(0, 2, 1, 3)``
  and ``Reshape`` to ``Concat(B, S, [-1])`` back.
* Mask: ``Where(Expand(allowed), 0.0, float32.min)`` where ``allowed`` is
  ``And(kv_idx <= q_idx or q_idx >= 0, attention_mask[batch_idx, kv_idx])``, the indexing
  written as ``Gather(Flatten(mask, axis=2), batch_idx * width + kv_idx)``.
* BERT and ViT Gelu: ``x * (Erf(x / sqrt2) + 1) * 0.5`` (Div, Erf, Add, Mul, Mul). GPT-2 Gelu
  (``gelu_new``): ``0.5x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * Pow(x, 3))))``.
* GPT-2 Conv1D: ``Reshape(x, [-1, Squeeze(Slice(Shape(x), -1:))]) -> Gemm(W[in, out], b) ->
  Reshape([B, S, out])``; QKV is one Gemm and a ``Split``; the tied lm_head is a separate
  transposed initializer.
* Llama RMSNorm: ``Cast, Pow 2, ReduceMean(-1), Add eps, Sqrt, Div(1, .), Mul, Cast, Mul(weight)``;
  SiLU: ``Sigmoid`` and ``Mul``; SwiGLU: ``Mul(silu(gate), up)``; RoPE: cos/sin computed once at
  run time from ``Range(S) * inv_freq`` (``Concat(f, f)``, ``Cos``/``Sin``), ``rotate_half`` as
  two ``Slice`` at ``Div(Gather(Shape(x), 3), 2)``, ``Neg``, ``Concat``; GQA ``repeat_kv``:
  ``Unsqueeze(2)``, the expand idiom to [B, kv_heads, n_rep, S, D], ``Reshape`` to
  [B, kv_heads * n_rep, S, D] with ``Mul(kv_heads, n_rep)`` computed at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "KINDS",
    "Config",
    "make_config",
    "export_hf",
    "hf_module",
    "hf_weights",
    "hf_reference",
    "bert_like",
    "vit_like",
    "gpt2_like",
    "llama_like",
    "HELPER_BUILDERS",
    "sample_inputs_for",
    "pooled_cosine",
    "hand_count",
    "graph_signature",
    "layer_op_counts",
    "rope_inv_freq",
]

KINDS = ("bert", "vit", "gpt2", "llama")
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime-training 1.19 reads IR <= 10
META_KIND = "transformer_models.kind"
META_CONFIG = "transformer_models.config"

_INT64_MAX = int(np.iinfo(np.int64).max)
_MASK_MIN = float(np.finfo(np.float32).min)
_EPS = {"bert": 1e-12, "vit": 1e-12, "gpt2": 1e-5, "llama": 1e-6}  # the transformers defaults
ROPE_THETA = 10000.0


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """Sizes of one model. Fields a kind does not use are reset to their defaults by
    ``make_config`` so that equal models have equal configs (and cache keys): ``kv_heads`` is
    Llama's (others use ``heads``), ``image``/``patch``/``channels`` are ViT's, ``vocab`` and
    ``max_positions`` the text models'."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    ffn: int = 128
    vocab: int = 512
    max_positions: int = 128
    image: int = 32
    patch: int = 8
    channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        """ViT sequence length: one token per patch plus the CLS token."""
        return (self.image // self.patch) ** 2 + 1


def make_config(kind: str, config: Config | Mapping[str, int] | None = None, **overrides: int) -> Config:
    """The canonical config of ``kind``: defaults, then ``config``, then ``overrides``; checks
    that the sizes divide (hidden by heads, heads by kv_heads, image by patch, even head_dim
    for RoPE)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    base = config if isinstance(config, Config) else Config(**dict(config or {}))
    known = {f.name for f in fields(Config)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
    cfg = replace(base, **overrides)
    default = Config()
    if kind != "llama":
        cfg = replace(cfg, kv_heads=cfg.heads)
    if kind == "vit":
        cfg = replace(cfg, vocab=default.vocab, max_positions=default.max_positions)
    else:
        cfg = replace(cfg, image=default.image, patch=default.patch, channels=default.channels)
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
        raise ValueError(
            f"hidden ({cfg.hidden}) must divide by heads ({cfg.heads}), heads by kv_heads ({cfg.kv_heads})"
        )
    if kind == "llama" and cfg.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if kind == "vit" and cfg.image % cfg.patch:
        raise ValueError(f"image ({cfg.image}) must divide by patch ({cfg.patch})")
    return cfg


def _config_of(model: onnx.ModelProto) -> tuple[str, Config] | None:
    meta = {p.key: p.value for p in model.metadata_props}
    if META_KIND not in meta:
        return None
    return meta[META_KIND], Config(**json.loads(meta[META_CONFIG]))


def _tag(model: onnx.ModelProto, kind: str, cfg: Config) -> None:
    """Record kind and config so ``sample_inputs_for`` knows the vocabulary and image size."""
    helper.set_model_props(model, {META_KIND: kind, META_CONFIG: json.dumps(asdict(cfg), sort_keys=True)})


# --------------------------------------------------------------------------- graph builder


class _Graph:
    """Writes nodes the way the TorchScript exporter does: one Constant node per constant use,
    node names from module scopes (``/encoder/layer.0/attention/self/MatMul``, so per-layer
    grouping works on both), weights as initializers named after the PyTorch state dict, Linear
    weights stored transposed ([in, out]) as the exporter folds them."""

    def __init__(self, seed: int, weights: Mapping[str, Any] | None):
        self.rng = np.random.default_rng(seed)
        self.weights = {k: np.asarray(v, dtype=np.float32) for k, v in (weights or {}).items()}
        self.used: set[str] = set()
        self.arrays: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = ""
        self._count: Counter[str] = Counter()

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        outer = self.prefix
        self.prefix = f"{outer}/{name}"
        try:
            yield
        finally:
            self.prefix = outer

    def _name(self, op: str) -> str:
        base = f"{self.prefix}/{op}"
        k = self._count[base]
        self._count[base] += 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, op: str, *inputs: str, **attrs: Any) -> str:
        name = self._name(op)
        self.nodes.append(helper.make_node(op, list(inputs), [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        name = self._name("Split")
        outs = [f"{name}_output_{i}" for i in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self.i64(sizes)], outs, name=name, axis=axis))
        return outs

    def const(self, value: Any, dtype: type) -> str:
        name = self._name("Constant")
        tensor = numpy_helper.from_array(np.array(value, dtype=dtype))
        self.nodes.append(helper.make_node("Constant", [], [f"{name}_output_0"], name=name, value=tensor))
        return f"{name}_output_0"

    def i64(self, value: Any) -> str:
        return self.const(value, np.int64)

    def f32(self, value: Any) -> str:
        return self.const(value, np.float32)

    # ---- parameters
    def param(
        self,
        name: str,
        shape: tuple[int, ...],
        init: Callable[[tuple[int, ...]], np.ndarray],
        *,
        transpose: bool = False,
    ) -> str:
        """An initializer: ``weights[name]`` (PyTorch layout, transposed for Linear) if given,
        else ``init(shape)``."""
        if name in self.weights:
            arr = self.weights[name].T if transpose else self.weights[name]
            if arr.shape != shape:
                raise ValueError(f"weight {name}: shape {arr.shape} (after transpose={transpose}), expected {shape}")
            self.used.add(name)
        else:
            arr = init(shape)
        self.arrays[name] = np.ascontiguousarray(arr, dtype=np.float32)
        return name

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """HF's init, std 0.02; also used for biases so that they are not zero."""
        return self.rng.normal(0.0, 0.02, shape)

    def near_one(self, shape: tuple[int, ...]) -> np.ndarray:
        return 1.0 + self.rng.normal(0.0, 0.02, shape)

    # ---- idioms of the exporter
    def dim(self, x: str, i: int) -> str:
        """``x.shape[i]``: a 0-d int64 computed at run time."""
        return self.op("Gather", self.op("Shape", x), self.i64(i), axis=0)

    def unsq(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.i64([axis]))

    def arange(self, n: str) -> str:
        return self.op("Range", self.i64(0), self.op("Cast", n, to=TensorProto.INT64), self.i64(1))

    def expand(self, x: str, shape: str) -> str:
        """``x.expand(*shape)`` with -1 entries: the exporter replaces -1 by 1 before Expand."""
        shape = self.op("Reshape", shape, self.i64([-1]), allowzero=0)
        ones = self.op(
            "ConstantOfShape", self.op("Shape", shape), value=numpy_helper.from_array(np.array([1], np.int64))
        )
        keep = self.op("Equal", shape, self.op("Mul", ones, self.i64(-1)))
        return self.op("Expand", x, self.op("Where", keep, ones, shape))

    def heads_shape(self, b: str, s: str, head_dim: int) -> str:
        return self.op("Concat", self.unsq(b, 0), self.unsq(s, 0), self.i64([-1]), self.i64([head_dim]), axis=0)

    def merge_heads(self, ctx: str, b: str, s: str) -> str:
        ctx = self.op("Transpose", ctx, perm=[0, 2, 1, 3])
        return self.op(
            "Reshape", ctx, self.op("Concat", self.unsq(b, 0), self.unsq(s, 0), self.i64([-1]), axis=0), allowzero=0
        )

    def linear(self, scope: str, x: str, name: str, n_in: int, n_out: int, *, bias: bool = True) -> str:
        """nn.Linear: MatMul by the transposed weight, then ``Add(bias, y)`` (bias first)."""
        with self.scope(scope):
            y = self.op("MatMul", x, self.param(f"{name}.weight", (n_in, n_out), self.normal, transpose=True))
            if bias:
                y = self.op("Add", self.param(f"{name}.bias", (n_out,), self.normal), y)
        return y

    def layer_norm(self, scope: str, x: str, name: str, n: int, eps: float) -> str:
        with self.scope(scope):
            return self.op(
                "LayerNormalization",
                x,
                self.param(f"{name}.weight", (n,), self.near_one),
                self.param(f"{name}.bias", (n,), self.normal),
                axis=-1,
                epsilon=eps,
            )

    def gelu_erf(self, scope: str, x: str) -> str:
        with self.scope(scope):
            y = self.op("Erf", self.op("Div", x, self.f32(math.sqrt(2.0))))
            return self.op("Mul", self.op("Mul", x, self.op("Add", y, self.f32(1.0))), self.f32(0.5))

    def attention_mask(
        self, mask: str, batch: str, q_len: str, kv_len: str, batch_idx: str, q_idx: str, kv_idx: str, *, causal: bool
    ) -> str:
        """transformers' ``eager_mask``: a [B, 1, S, S_kv] float mask, 0 where attended and
        float32.min elsewhere, from the mask function (causal or bidirectional) and the padding
        mask indexed as ``mask[batch_idx, kv_idx]``."""
        true = self.op("ConstantOfShape", self.i64(np.zeros(0)), value=numpy_helper.from_array(np.array([True])))
        if causal:
            cond = self.op("LessOrEqual", kv_idx, q_idx)
        else:
            cond = self.op("GreaterOrEqual", q_idx, self.i64(0))
        allowed = self.op("And", true, self.op("Cast", cond, to=TensorProto.BOOL))
        width = self.op("Gather", self.op("Shape", mask), self.i64([1]), axis=0)
        flat = self.op("Flatten", mask, axis=2)
        index = self.op("Add", kv_idx, self.op("Mul", batch_idx, width))
        picked = self.op("Gather", flat, index, axis=0)
        index_shape = self.op("Shape", index)
        picked = self.op("Reshape", picked, self.i64([-1]), allowzero=0)
        picked = self.op("Reshape", picked, self.op("Concat", index_shape, axis=0), allowzero=0)
        allowed = self.op("And", allowed, self.op("Cast", picked, to=TensorProto.BOOL))
        shape = self.op(
            "Concat", self.unsq(batch, 0), self.i64([-1]), self.unsq(q_len, 0), self.unsq(kv_len, 0), axis=0
        )
        return self.op("Where", self.expand(allowed, shape), self.f32(0.0), self.f32(_MASK_MIN))

    def index_grid(self, batch: str, kv_len: str) -> tuple[str, str]:
        """``arange(B)[:, None, None, None]`` and ``arange(S_kv)[None, None, None, :]``."""
        batch_idx = self.arange(batch)
        kv_idx = self.arange(kv_len)
        for axis in (1, 2, 3):
            batch_idx = self.unsq(batch_idx, axis)
        for axis in (0, 1, 2):
            kv_idx = self.unsq(kv_idx, axis)
        return batch_idx, kv_idx

    def build(
        self,
        name: str,
        kind: str,
        cfg: Config,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[tuple[str, onnx.ValueInfoProto]],
    ) -> onnx.ModelProto:
        unused = set(self.weights) - self.used
        if unused:
            raise ValueError(f"{name}: weights not used by the graph: {sorted(unused)[:8]}")
        renames = {src: vi.name for src, vi in outputs}
        for node in self.nodes:
            for i, o in enumerate(node.output):
                if o in renames:
                    node.output[i] = renames[o]
        inits = [numpy_helper.from_array(a, n) for n, a in self.arrays.items()]
        graph = helper.make_graph(self.nodes, name, inputs, [vi for _, vi in outputs], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
        model.ir_version = 8
        _tag(model, kind, cfg)
        onnx.checker.check_model(model, full_check=True)
        return model


def _text_inputs(batch: int | str, seq: int | str) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, seq]) for n in ("input_ids", "attention_mask")]


# --------------------------------------------------------------------------- onnx.helper models


def bert_like(
    config: Config | Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    weights: Mapping[str, Any] | None = None,
    batch: int | str = "B",
    seq: int | str = "S",
    **overrides: int,
) -> onnx.ModelProto:
    """BertModel without pooler: ``input_ids``, ``attention_mask`` (int64 [B, S]) ->
    ``last_hidden_state`` (float [B, S, hidden]). Post-norm layers, Erf Gelu, absolute position
    and token-type embeddings (token types are zeros taken from a buffer, as in the export)."""
    cfg = make_config("bert", config, **overrides)
    g = _Graph(seed, weights)
    h, hd, eps = cfg.hidden, cfg.head_dim, _EPS["bert"]
    with g.scope("embeddings"):
        b0, s0 = g.dim("input_ids", 0), g.dim("input_ids", 1)
        positions = np.arange(cfg.max_positions, dtype=np.int64)[None]
        pos = g.op("Slice", g.i64(positions), g.i64([0]), g.unsq(s0, 0), g.i64([1]), g.i64([1]))
        n = g.dim(pos, 0)
        types = g.expand(g.i64(np.zeros_like(positions)), g.op("Concat", g.unsq(n, 0), g.i64([-1]), axis=0))
        types = g.op("GatherElements", types, pos, axis=1)
        types = g.expand(types, g.op("Concat", g.unsq(b0, 0), g.unsq(s0, 0), axis=0))
        with g.scope("word_embeddings"):
            x = g.op("Gather", g.param("embeddings.word_embeddings.weight", (cfg.vocab, h), g.normal), "input_ids")
        with g.scope("token_type_embeddings"):
            t = g.op("Gather", g.param("embeddings.token_type_embeddings.weight", (2, h), g.normal), types)
        x = g.op("Add", x, t)
        with g.scope("position_embeddings"):
            p = g.op("Gather", g.param("embeddings.position_embeddings.weight", (cfg.max_positions, h), g.normal), pos)
        x = g.op("Add", x, p)
        x = g.layer_norm("LayerNorm", x, "embeddings.LayerNorm", h, eps)
    mask = g.op("Cast", "attention_mask", to=TensorProto.BOOL)
    q_len, kv_len, batch_ = g.dim(x, 1), g.dim(mask, 1), g.dim(x, 0)
    batch_idx, kv_idx = g.index_grid(batch_, kv_len)
    q_idx = g.arange(q_len)
    for axis in (0, 1, 3):
        q_idx = g.unsq(q_idx, axis)
    mask_add = g.attention_mask(mask, batch_, q_len, kv_len, batch_idx, q_idx, kv_idx, causal=False)
    for i in range(cfg.layers):
        name = f"encoder.layer.{i}"
        with g.scope(f"encoder/layer.{i}"):
            with g.scope("attention/self"):
                # The exporter merges layer 0's batch and length with the mask's (same tensor).
                b, s = (batch_, q_len) if i == 0 else (g.dim(x, 0), g.dim(x, 1))
                q = g.linear("query", x, f"{name}.attention.self.query", h, h)
                shapes = [g.heads_shape(b, s, hd) for _ in range(3)]
                q = g.op("Transpose", g.op("Reshape", q, shapes[0], allowzero=0), perm=[0, 2, 1, 3])
                k = g.op("Reshape", g.linear("key", x, f"{name}.attention.self.key", h, h), shapes[1], allowzero=0)
                v = g.op("Reshape", g.linear("value", x, f"{name}.attention.self.value", h, h), shapes[2], allowzero=0)
                v = g.op("Transpose", v, perm=[0, 2, 1, 3])
                scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 3, 1]))
                scores = g.op("Add", g.op("Mul", scores, g.f32(hd**-0.5)), mask_add)
                ctx = g.merge_heads(g.op("MatMul", g.op("Softmax", scores, axis=-1), v), b, s)
            with g.scope("attention/output"):
                y = g.linear("dense", ctx, f"{name}.attention.output.dense", h, h)
                y = g.layer_norm("LayerNorm", g.op("Add", y, x), f"{name}.attention.output.LayerNorm", h, eps)
            with g.scope("intermediate"):
                z = g.gelu_erf("intermediate_act_fn", g.linear("dense", y, f"{name}.intermediate.dense", h, cfg.ffn))
            with g.scope("output"):
                z = g.linear("dense", z, f"{name}.output.dense", cfg.ffn, h)
                x = g.layer_norm("LayerNorm", g.op("Add", z, y), f"{name}.output.LayerNorm", h, eps)
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, seq, h])
    return g.build("bert_like", "bert", cfg, _text_inputs(batch, seq), [(x, out)])


def vit_like(
    config: Config | Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    weights: Mapping[str, Any] | None = None,
    batch: int | str = "B",
    **overrides: int,
) -> onnx.ModelProto:
    """ViTModel without pooler: ``pixel_values`` (float [B, C, image, image]) ->
    ``last_hidden_state`` (float [B, tokens, hidden]). Patch embedding as a strided Conv, CLS
    token expanded to the batch, learned positions, pre-norm layers, Erf Gelu, no mask."""
    cfg = make_config("vit", config, **overrides)
    g = _Graph(seed, weights)
    h, hd, eps, p = cfg.hidden, cfg.head_dim, _EPS["vit"], cfg.patch
    with g.scope("embeddings"):
        b0 = g.dim("pixel_values", 0)
        with g.scope("patch_embeddings"):
            with g.scope("projection"):
                w = g.param("embeddings.patch_embeddings.projection.weight", (h, cfg.channels, p, p), g.normal)
                conv = g.op(
                    "Conv",
                    "pixel_values",
                    w,
                    g.param("embeddings.patch_embeddings.projection.bias", (h,), g.normal),
                    dilations=[1, 1],
                    group=1,
                    kernel_shape=[p, p],
                    pads=[0, 0, 0, 0],
                    strides=[p, p],
                )
            lead = g.op("Slice", g.op("Shape", conv), g.i64([0]), g.i64([2]), g.i64([0]))
            patches = g.op("Reshape", conv, g.op("Concat", lead, g.i64([-1]), axis=0), allowzero=0)
            patches = g.op("Transpose", patches, perm=[0, 2, 1])
        cls = g.param("embeddings.cls_token", (1, 1, h), g.normal)
        cls = g.expand(cls, g.op("Concat", g.unsq(b0, 0), g.i64([-1]), g.i64([-1]), axis=0))
        x = g.op("Concat", cls, patches, axis=1)
        x = g.op("Add", x, g.param("embeddings.position_embeddings", (1, cfg.tokens, h), g.normal))
    for i in range(cfg.layers):
        name = f"layers.{i}"
        with g.scope(name):
            y = g.layer_norm("layernorm_before", x, f"{name}.layernorm_before", h, eps)
            with g.scope("attention"):
                b, s = g.dim(y, 0), g.dim(y, 1)
                q = g.linear("q_proj", y, f"{name}.attention.q_proj", h, h)
                shapes = [g.heads_shape(b, s, hd) for _ in range(3)]
                q = g.op("Transpose", g.op("Reshape", q, shapes[0], allowzero=0), perm=[0, 2, 1, 3])
                k = g.op("Reshape", g.linear("k_proj", y, f"{name}.attention.k_proj", h, h), shapes[1], allowzero=0)
                v = g.op("Reshape", g.linear("v_proj", y, f"{name}.attention.v_proj", h, h), shapes[2], allowzero=0)
                v = g.op("Transpose", v, perm=[0, 2, 1, 3])
                scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 3, 1]))
                probs = g.op("Softmax", g.op("Mul", scores, g.f32(hd**-0.5)), axis=-1)
                probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT), to=TensorProto.FLOAT)
                ctx = g.merge_heads(g.op("MatMul", probs, v), b, s)
                y = g.linear("o_proj", ctx, f"{name}.attention.o_proj", h, h)
            x = g.op("Add", y, x)
            y = g.layer_norm("layernorm_after", x, f"{name}.layernorm_after", h, eps)
            with g.scope("mlp"):
                y = g.gelu_erf("activation_fn", g.linear("fc1", y, f"{name}.mlp.fc1", h, cfg.ffn))
                y = g.linear("fc2", y, f"{name}.mlp.fc2", cfg.ffn, h)
            x = g.op("Add", y, x)
    x = g.layer_norm("layernorm", x, "layernorm", h, eps)
    image = [batch, cfg.channels, cfg.image, cfg.image]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, image)]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, cfg.tokens, h])
    return g.build("vit_like", "vit", cfg, inputs, [(x, out)])


def _conv1d(g: _Graph, scope: str, x: str, name: str, n_in: int, n_out: int) -> str:
    """GPT-2's Conv1D (``addmm(bias, x.view(-1, n_in), W)`` with W stored [in, out])."""
    with g.scope(scope):
        b, s = g.dim(x, 0), g.dim(x, 1)
        last = g.op("Slice", g.op("Shape", x), g.i64([-1]), g.i64([_INT64_MAX]), g.i64([0]))
        last = g.op("Squeeze", last, g.i64([0]))
        x2 = g.op("Reshape", x, g.op("Concat", g.i64([-1]), g.unsq(last, 0), axis=0), allowzero=0)
        y = g.op(
            "Gemm",
            x2,
            g.param(f"{name}.weight", (n_in, n_out), g.normal),
            g.param(f"{name}.bias", (n_out,), g.normal),
            alpha=1.0,
            beta=1.0,
        )
        return g.op("Reshape", y, g.op("Concat", g.unsq(b, 0), g.unsq(s, 0), g.i64([n_out]), axis=0), allowzero=0)


def gpt2_like(
    config: Config | Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    weights: Mapping[str, Any] | None = None,
    batch: int | str = "B",
    seq: int | str = "S",
    **overrides: int,
) -> onnx.ModelProto:
    """GPT2LMHeadModel without KV cache: ``input_ids``, ``attention_mask`` -> ``logits``
    [B, S, vocab]. Pre-norm blocks, Conv1D projections (Gemm between Reshapes), one QKV Gemm
    and a Split, tanh Gelu, causal + padding mask, lm_head tied to the token embedding (stored
    again, transposed, as the export does)."""
    cfg = make_config("gpt2", config, **overrides)
    g = _Graph(seed, weights)
    h, hd, eps = cfg.hidden, cfg.head_dim, _EPS["gpt2"]
    with g.scope("transformer"):
        s_in = g.dim("input_ids", 1)
        ids = g.op("Reshape", "input_ids", g.op("Concat", g.i64([-1]), g.unsq(s_in, 0), axis=0), allowzero=0)
        b_ids = g.dim(ids, 0)
        with g.scope("wte"):
            wte = g.param("transformer.wte.weight", (cfg.vocab, h), g.normal)
            tok = g.op("Gather", wte, ids)
        s = g.dim(tok, 1)
        pos = g.unsq(g.arange(s), 0)
        with g.scope("wpe"):
            p = g.op("Gather", g.param("transformer.wpe.weight", (cfg.max_positions, h), g.normal), pos)
        x = g.op("Add", tok, g.op("Cast", p, to=TensorProto.FLOAT))
        am = g.op("Reshape", "attention_mask", g.op("Concat", g.unsq(b_ids, 0), g.i64([-1]), axis=0), allowzero=0)
        mask = g.op("Cast", am, to=TensorProto.BOOL)
        kv_len, b = g.dim(mask, 1), g.dim(tok, 0)
        batch_idx, kv_idx = g.index_grid(b, kv_len)
        q_idx = g.unsq(g.unsq(pos, 1), 3)
        mask_add = g.attention_mask(mask, b, s, kv_len, batch_idx, q_idx, kv_idx, causal=True)
        width = g.op("Slice", g.op("Shape", x), g.i64([-1]), g.i64([_INT64_MAX]), g.i64([0]))
        width = g.op("Squeeze", width, g.i64([0]))
        for i in range(cfg.layers):
            name = f"transformer.h.{i}"
            with g.scope(f"h.{i}"):
                y = g.layer_norm("ln_1", x, f"{name}.ln_1", h, eps)
                with g.scope("attn"):
                    qkv = _conv1d(g, "c_attn", y, f"{name}.attn.c_attn", h, 3 * h)
                    q, k, v = g.split(qkv, [h, h, h], axis=2)
                    kb, ks = g.dim(k, 0), g.dim(k, 1)
                    k = g.op("Reshape", k, g.heads_shape(kb, ks, hd), allowzero=0)
                    v = g.op("Reshape", v, g.heads_shape(kb, ks, hd), allowzero=0)
                    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
                    qb, qs = g.dim(q, 0), g.dim(q, 1)
                    q = g.op("Transpose", g.op("Reshape", q, g.heads_shape(qb, qs, hd), allowzero=0), perm=[0, 2, 1, 3])
                    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 3, 1]))
                    scores = g.op("Add", g.op("Mul", scores, g.f32(hd**-0.5)), mask_add)
                    probs = g.op("Cast", g.op("Softmax", scores, axis=-1), to=TensorProto.FLOAT)
                    ctx = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
                    cb, cs = g.dim(ctx, 0), g.dim(ctx, 1)
                    ctx = g.op(
                        "Reshape", ctx, g.op("Concat", g.unsq(cb, 0), g.unsq(cs, 0), g.i64([-1]), axis=0), allowzero=0
                    )
                    y = _conv1d(g, "c_proj", ctx, f"{name}.attn.c_proj", h, h)
                x = g.op("Add", y, x)
                y = g.layer_norm("ln_2", x, f"{name}.ln_2", h, eps)
                with g.scope("mlp"):
                    y = _conv1d(g, "c_fc", y, f"{name}.mlp.c_fc", h, cfg.ffn)
                    with g.scope("act"):
                        half = g.op("Mul", y, g.f32(0.5))
                        cube = g.op("Mul", g.op("Pow", y, g.f32(3.0)), g.f32(0.044715))
                        inner = g.op("Mul", g.op("Add", y, cube), g.f32(math.sqrt(2.0 / math.pi)))
                        y = g.op("Mul", half, g.op("Add", g.op("Tanh", inner), g.f32(1.0)))
                    y = _conv1d(g, "c_proj", y, f"{name}.mlp.c_proj", cfg.ffn, h)
                x = g.op("Add", x, y)
        x = g.layer_norm("ln_f", x, "transformer.ln_f", h, eps)
        x = g.op("Reshape", x, g.op("Concat", g.i64([-1]), g.unsq(s_in, 0), g.unsq(width, 0), axis=0), allowzero=0)
    with g.scope("lm_head"):
        head = g.param("lm_head.weight", (h, cfg.vocab), lambda _: g.arrays[wte].T, transpose=True)
        logits = g.op("MatMul", x, head)
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, cfg.vocab])
    return g.build("gpt2_like", "gpt2", cfg, _text_inputs(batch, seq), [(logits, out)])


def _rms_norm(g: _Graph, scope: str, x: str, name: str, n: int) -> tuple[str, str]:
    """LlamaRMSNorm; returns (normed, the float cast of x), the cast being what the export then
    uses as the residual."""
    with g.scope(scope):
        xf = g.op("Cast", x, to=TensorProto.FLOAT)
        var = g.op("ReduceMean", g.op("Pow", xf, g.f32(2.0)), axes=[-1], keepdims=1)
        inv = g.op("Div", g.f32(1.0), g.op("Sqrt", g.op("Add", var, g.f32(_EPS["llama"]))))
        y = g.op("Cast", g.op("Mul", xf, inv), to=TensorProto.FLOAT)
        return g.op("Mul", g.param(f"{name}.weight", (n,), g.near_one), y), xf


def _rope(g: _Graph, t: str, cos: str, sin: str) -> str:
    """``t * cos + rotate_half(t) * sin``, rotate_half slicing at ``t.shape[-1] // 2``."""
    half = g.op("Div", g.dim(t, 3), g.i64(2))
    half = g.op("Cast", g.op("Cast", half, to=TensorProto.INT64), to=TensorProto.INT64)
    x1 = g.op("Slice", t, g.i64([0]), g.unsq(half, 0), g.i64([3]), g.i64([1]))
    x2 = g.op("Slice", t, g.unsq(half, 0), g.i64([_INT64_MAX]), g.i64([3]), g.i64([1]))
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rotated, sin))


def _repeat_kv(g: _Graph, t: str, n_rep: int) -> str:
    """``t[:, :, None].expand(B, kv, n_rep, S, D).reshape(B, kv * n_rep, S, D)``; a no-op for
    n_rep == 1, as in transformers."""
    if n_rep == 1:
        return t
    b, kv, s, d = (g.dim(t, i) for i in range(4))
    shape = g.op("Concat", g.unsq(b, 0), g.unsq(kv, 0), g.i64([n_rep]), g.unsq(s, 0), g.unsq(d, 0), axis=0)
    e = g.expand(g.unsq(t, 2), shape)
    heads = g.op("Mul", kv, g.i64(n_rep))
    return g.op(
        "Reshape", e, g.op("Concat", g.unsq(b, 0), g.unsq(heads, 0), g.unsq(s, 0), g.unsq(d, 0), axis=0), allowzero=0
    )


def rope_inv_freq(head_dim: int, theta: float = ROPE_THETA) -> np.ndarray:
    """``1 / theta ** (arange(0, D, 2) / D)`` in float32, as LlamaRotaryEmbedding computes it."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / np.power(np.float32(theta), exps)).astype(np.float32)


def llama_like(
    config: Config | Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    weights: Mapping[str, Any] | None = None,
    batch: int | str = "B",
    seq: int | str = "S",
    **overrides: int,
) -> onnx.ModelProto:
    """LlamaForCausalLM without KV cache: ``input_ids``, ``attention_mask`` -> ``logits``.
    RMSNorm, RoPE (cos/sin computed at run time from the positions), grouped-query attention
    (``kv_heads`` K/V heads repeated to ``heads``), SwiGLU MLP, no biases, untied lm_head."""
    cfg = make_config("llama", config, **overrides)
    g = _Graph(seed, weights)
    h, hd, nh, nkv = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads
    with g.scope("model"):
        with g.scope("embed_tokens"):
            x = g.op("Gather", g.param("model.embed_tokens.weight", (cfg.vocab, h), g.normal), "input_ids")
        s = g.dim(x, 1)
        pos = g.unsq(g.arange(s), 0)
        mask = g.op("Cast", "attention_mask", to=TensorProto.BOOL)
        kv_len, b = g.dim(mask, 1), g.dim(x, 0)
        batch_idx, kv_idx = g.index_grid(b, kv_len)
        q_idx = g.unsq(g.unsq(pos, 1), 3)
        mask_add = g.attention_mask(mask, b, s, kv_len, batch_idx, q_idx, kv_idx, causal=True)
        with g.scope("rotary_emb"):
            freqs = g.op("Mul", g.op("Cast", g.unsq(pos, 2), to=TensorProto.FLOAT), g.f32(rope_inv_freq(hd)))
            emb = g.op("Concat", freqs, freqs, axis=-1)
            cos = g.op("Mul", g.op("Cos", emb), g.f32(1.0))
            sin = g.op("Mul", g.op("Sin", emb), g.f32(1.0))
            cos, sin = g.op("Cast", cos, to=TensorProto.FLOAT), g.op("Cast", sin, to=TensorProto.FLOAT)
        rope: tuple[str, str] | None = None
        for i in range(cfg.layers):
            name = f"model.layers.{i}"
            with g.scope(f"layers.{i}"):
                y, residual = _rms_norm(g, "input_layernorm", x, f"{name}.input_layernorm", h)
                with g.scope("self_attn"):
                    bb, ss = g.dim(y, 0), g.dim(y, 1)
                    q = g.linear("q_proj", y, f"{name}.self_attn.q_proj", h, nh * hd, bias=False)
                    shapes = [g.heads_shape(bb, ss, hd) for _ in range(3)]
                    q = g.op("Transpose", g.op("Reshape", q, shapes[0], allowzero=0), perm=[0, 2, 1, 3])
                    k = g.linear("k_proj", y, f"{name}.self_attn.k_proj", h, nkv * hd, bias=False)
                    k = g.op("Transpose", g.op("Reshape", k, shapes[1], allowzero=0), perm=[0, 2, 1, 3])
                    v = g.linear("v_proj", y, f"{name}.self_attn.v_proj", h, nkv * hd, bias=False)
                    v = g.op("Transpose", g.op("Reshape", v, shapes[2], allowzero=0), perm=[0, 2, 1, 3])
                    if rope is None:  # every layer unsqueezes the same cos/sin; the exporter keeps one
                        rope = (g.unsq(cos, 1), g.unsq(sin, 1))
                    q, k = _rope(g, q, *rope), _rope(g, k, *rope)
                    k, v = _repeat_kv(g, k, nh // nkv), _repeat_kv(g, v, nh // nkv)
                    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
                    scores = g.op("Add", g.op("Mul", scores, g.f32(hd**-0.5)), mask_add)
                    probs = g.op("Softmax", scores, axis=-1)
                    probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT), to=TensorProto.FLOAT)
                    ctx = g.merge_heads(g.op("MatMul", probs, v), bb, ss)
                    y = g.linear("o_proj", ctx, f"{name}.self_attn.o_proj", nh * hd, h, bias=False)
                x = g.op("Add", residual, y)
                y, residual = _rms_norm(g, "post_attention_layernorm", x, f"{name}.post_attention_layernorm", h)
                with g.scope("mlp"):
                    gate = g.linear("gate_proj", y, f"{name}.mlp.gate_proj", h, cfg.ffn, bias=False)
                    with g.scope("act_fn"):
                        gate = g.op("Mul", gate, g.op("Sigmoid", gate))
                    up = g.linear("up_proj", y, f"{name}.mlp.up_proj", h, cfg.ffn, bias=False)
                    y = g.linear("down_proj", g.op("Mul", gate, up), f"{name}.mlp.down_proj", cfg.ffn, h, bias=False)
                x = g.op("Add", residual, y)
        x, _ = _rms_norm(g, "norm", x, "model.norm", h)
    logits = g.linear("lm_head", x, "lm_head", h, cfg.vocab, bias=False)
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, cfg.vocab])
    return g.build("llama_like", "llama", cfg, _text_inputs(batch, seq), [(logits, out)])


HELPER_BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "bert": bert_like,
    "vit": vit_like,
    "gpt2": gpt2_like,
    "llama": llama_like,
}


# --------------------------------------------------------------------------- counts


def hand_count(
    kind: str, config: Config | Mapping[str, int] | None = None, batch: int = 1, seq: int = 16
) -> dict[str, int]:
    """Parameters and MACs of the models above, from the config alone.

    ``params`` is the number of float elements in the graph's initializers: the learned weights,
    with GPT-2's tied lm_head counted twice because the export stores it twice. It leaves out
    Constant nodes (shape arithmetic, BERT's position/token-type buffers, Llama's inv_freq): a
    few hundred elements, under 1% here. ``macs`` counts every MatMul and Gemm (projections,
    QK^T, AV, lm_head) and the ViT patch Conv, for ``batch`` samples of ``seq`` tokens (ViT:
    ``cfg.tokens``, ``seq`` is ignored); elementwise work is not counted.

    With h = hidden, f = ffn, L = layers, V = vocab, P = max_positions, D = head_dim,
    kv = kv_heads * D, s = seq, per sample::

        bert   params  V*h + P*h + 2*h + 2*h + L*(4*(h*h + h) + 2*h*f + f + h + 4*h)
               macs    L*(4*s*h*h + 2*s*s*h + 2*s*h*f)
        vit    params  C*p*p*h + h + h + T*h + L*(4*(h*h + h) + 2*h*f + f + h + 4*h) + 2*h
               macs    (T-1)*h*C*p*p + L*(4*T*h*h + 2*T*T*h + 2*T*h*f)      (T = tokens)
        gpt2   params  V*h + P*h + L*(4*h + 3*h*h + 3*h + h*h + h + 2*h*f + f + h) + 2*h + h*V
               macs    L*(4*s*h*h + 2*s*s*h + 2*s*h*f) + s*h*V
        llama  params  V*h + L*(2*h + 2*h*h + 2*h*kv + 3*h*f) + h + h*V
               macs    L*(2*s*h*h + 2*s*h*kv + 2*s*s*h + 3*s*h*f) + s*h*V

    QK^T and AV are heads * s * s * D = s*s*h each, also with GQA (K/V are repeated first)."""
    cfg = make_config(kind, config)
    h, f, n_layers, vocab, kv = cfg.hidden, cfg.ffn, cfg.layers, cfg.vocab, cfg.kv_heads * cfg.head_dim
    s = cfg.tokens if kind == "vit" else seq
    if kind in ("bert", "vit"):
        layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
        macs = n_layers * (4 * s * h * h + 2 * s * s * h + 2 * s * h * f)
        if kind == "bert":
            params = vocab * h + cfg.max_positions * h + 2 * h + 2 * h + n_layers * layer
        else:
            pixels = cfg.channels * cfg.patch * cfg.patch
            params = pixels * h + h + h + s * h + n_layers * layer + 2 * h
            macs += (s - 1) * h * pixels
    elif kind == "gpt2":
        layer = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h
        params = vocab * h + cfg.max_positions * h + n_layers * layer + 2 * h + h * vocab
        macs = n_layers * (4 * s * h * h + 2 * s * s * h + 2 * s * h * f) + s * h * vocab
    else:
        params = vocab * h + n_layers * (2 * h + 2 * h * h + 2 * h * kv + 3 * h * f) + h + h * vocab
        macs = n_layers * (2 * s * h * h + 2 * s * h * kv + 2 * s * s * h + 3 * s * h * f) + s * h * vocab
    return {"params": params, "macs": batch * macs}


# --------------------------------------------------------------------------- inputs and metrics


def _vocab_of(model: onnx.ModelProto) -> int:
    """Rows of the embedding table that ``input_ids`` indexes (through Reshape/Cast if any)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {"input_ids"}
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type in ("Reshape", "Cast", "Identity") and node.input[0] in names:
            names.add(node.output[0])
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    raise ValueError("cannot find the embedding table that input_ids indexes")


def sample_inputs_for(model: onnx.ModelProto, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid feeds: token ids below the vocabulary size, an attention mask of ones whose last row
    ends in padding (the last quarter of the positions zero, so masking is exercised), and
    standard-normal pixel values of the model's image size."""
    rng = np.random.default_rng(seed)
    tagged = _config_of(model)
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name == "input_ids":
            vocab = tagged[1].vocab if tagged else _vocab_of(model)
            feeds[vi.name] = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        elif vi.name == "attention_mask":
            mask = np.ones((batch, seq), dtype=np.int64)
            if seq > 1:
                mask[-1, seq - max(1, seq // 4) :] = 0
            feeds[vi.name] = mask
        elif vi.name == "pixel_values":
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
            if not all(dims):
                cfg = tagged[1] if tagged else Config()
                dims = [cfg.channels, cfg.image, cfg.image]
            feeds[vi.name] = rng.standard_normal((batch, *dims)).astype(np.float32)
        else:
            raise ValueError(f"no sample for input {vi.name!r}")
    return feeds


def token_feeds(model: onnx.ModelProto, n: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Unlabelled text-like feeds: random token ids (:func:`sample_inputs_for`) and attention masks
    padded at random lengths (a quarter to all of ``seq`` tokens kept)."""
    feeds = sample_inputs_for(model, n, seq, seed=seed)
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, seq), np.int64)
    for i, length in enumerate(rng.integers(seq // 4, seq + 1, n)):
        mask[i, :length] = 1
    feeds["attention_mask"] = mask
    return feeds


def pooled_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """How encoders are judged: mean over the batch of the cosine between the mask-weighted
    means over the sequence of ``a`` and ``b`` ([B, S, H]); no mask means plain means."""
    w = np.ones(a.shape[:2]) if mask is None else np.asarray(mask, dtype=np.float64)
    pa = (a * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    pb = (b * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    cos = (pa * pb).sum(-1) / (np.linalg.norm(pa, axis=-1) * np.linalg.norm(pb, axis=-1) + 1e-30)
    return float(cos.mean())


# --------------------------------------------------------------------------- structure


def _value_key(t: onnx.TensorProto) -> tuple:
    arr = numpy_helper.to_array(t)
    if arr.dtype.kind == "f":  # 6 significant digits: numpy's and torch's float32 pow differ in the last ulp
        return ("f", arr.shape, tuple(float(f"{v:.6g}") for v in arr.flat))
    return (str(arr.dtype), arr.shape, tuple(arr.flat))


def _attr_key(a: onnx.AttributeProto) -> tuple:
    v = helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        v = _value_key(v)
    elif isinstance(v, list):
        v = tuple(v)
    elif isinstance(v, float):
        v = float(f"{v:.6g}")
    return (a.name, v)


def graph_signature(model: onnx.ModelProto) -> Counter[str]:
    """The graph as a multiset of Merkle hashes: a node's hash covers its op, attributes and the
    hashes of its inputs (graph inputs by name, initializers by shape, Constant nodes by value),
    so two models have equal signatures when they are the same DAG up to names, node order and
    weight values. Constant nodes are folded into their users' hashes."""
    inits = {t.name: ("init", tuple(t.dims)) for t in model.graph.initializer}
    known: dict[str, str] = {"": "none"}
    for vi in model.graph.input:
        known[vi.name] = f"input:{vi.name}"
    out: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type == "Constant":
            known[node.output[0]] = repr(("const", _value_key(node.attribute[0].t)))
            continue
        ins = [inits[i] if i in inits else known[i] for i in node.input]
        digest = hashlib.sha1(repr((node.op_type, sorted(map(_attr_key, node.attribute)), ins)).encode()).hexdigest()
        out[f"{node.op_type}:{digest[:16]}"] += 1
        for k, o in enumerate(node.output):
            known[o] = f"{digest}:{k}"
    return out


def layer_op_counts(model: onnx.ModelProto) -> dict[str, Counter[str]]:
    """Op types (Constant excluded) per transformer layer, found from the node names' module
    scope (``layer.3/``, ``layers.3/``, ``h.3/``), and the rest under ``"other"``."""
    pattern = re.compile(r"/(?:layer|layers|h)\.(\d+)/")
    groups: dict[str, Counter[str]] = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        m = pattern.search(node.name)
        groups.setdefault(f"layer{m.group(1)}" if m else "other", Counter())[node.op_type] += 1
    return groups


# --------------------------------------------------------------------------- Hugging Face exports

_MODULES: dict[tuple[str, Config, int], Any] = {}
_EXPORTS: dict[tuple[str, Config, int], bytes] = {}


def _require_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"export_hf needs torch and transformers ({e}); use the *_like builders instead") from e
    return torch, transformers


def _hf_config(kind: str, cfg: Config) -> Any:
    import transformers

    common = {
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn,
        "attn_implementation": "eager",
    }
    if kind == "bert":
        return transformers.BertConfig(vocab_size=cfg.vocab, max_position_embeddings=cfg.max_positions, **common)
    if kind == "vit":
        return transformers.ViTConfig(image_size=cfg.image, patch_size=cfg.patch, num_channels=cfg.channels, **common)
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab,
            n_embd=cfg.hidden,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_inner=cfg.ffn,
            n_positions=cfg.max_positions,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab,
        max_position_embeddings=cfg.max_positions,
        num_key_value_heads=cfg.kv_heads,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        **common,
    )


def hf_module(kind: str, *, seed: int = 0, **overrides: int) -> Any:
    """The eval-mode ``torch.nn.Module`` that ``export_hf`` exports (cached): it takes the ONNX
    inputs positionally and calls the Hugging Face model by keyword (newer forward signatures
    have more positional parameters), returning ``last_hidden_state`` or ``logits``.

    Weights are HF's seeded init, then every parameter that init leaves constant (zero biases,
    unit norm weights) gets N(0, 0.02) noise: tests should exercise biases, and the exporter
    would otherwise merge the identical initializers into one and add Identity nodes."""
    torch, transformers = _require_torch()
    cfg = make_config(kind, **overrides)
    key = (kind, cfg, seed)
    if key in _MODULES:
        return _MODULES[key]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config and generation-config chatter
    try:
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            hf_cfg = _hf_config(kind, cfg)
            if kind == "bert":
                model = transformers.BertModel(hf_cfg, add_pooling_layer=False)
            elif kind == "vit":
                model = transformers.ViTModel(hf_cfg, add_pooling_layer=False)
            elif kind == "gpt2":
                model = transformers.GPT2LMHeadModel(hf_cfg)
            else:
                model = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        transformers.logging.set_verbosity(verbosity)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"{kind}: attention implementation is {model.config._attn_implementation}, not eager")

    class Call(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            if kind == "vit":
                return self.model(pixel_values=inputs[0]).last_hidden_state
            if kind == "bert":
                return self.model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
            return self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False).logits

    # eval() on the wrapper too: export restores the wrapper's mode on exit, and a fresh Module
    # is in training mode, which would switch dropout on in the model afterwards.
    module = Call(model).eval()
    _MODULES[key] = module
    return module


def hf_weights(kind: str, *, seed: int = 0, **overrides: int) -> dict[str, np.ndarray]:
    """The HF model's state dict as numpy arrays: pass it as ``weights=`` to the matching
    ``*_like`` builder to get the same numbers as the export."""
    return {k: v.detach().numpy().copy() for k, v in hf_module(kind, seed=seed, **overrides).model.state_dict().items()}


def hf_reference(kind: str, feeds: Mapping[str, np.ndarray], *, seed: int = 0, **overrides: int) -> np.ndarray:
    """The PyTorch output for ONNX-style ``feeds``."""
    torch, _ = _require_torch()
    names = ["pixel_values"] if kind == "vit" else ["input_ids", "attention_mask"]
    with torch.no_grad():
        return hf_module(kind, seed=seed, **overrides)(*[torch.from_numpy(np.asarray(feeds[n])) for n in names]).numpy()


def export_hf(
    kind: str,
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    **overrides: int,
) -> onnx.ModelProto:
    """Export the seeded random Hugging Face ``kind`` model (``hf_module``) to ONNX, write it to
    ``path`` if given, and return it (a fresh copy on every call).

    TorchScript exporter (``dynamo=False``; the dynamo exporter and sdpa attention trace to
    different graphs), opset 17, IR version <= 10, dims ``B`` and ``S`` symbolic (ViT: ``B``).
    Inputs: ``input_ids`` and ``attention_mask`` (int64 [B, S]) or ``pixel_values``; output:
    ``last_hidden_state`` (BERT, ViT) or ``logits`` (GPT-2, Llama; no KV cache). Cached in this
    process per (kind, config, seed), and in ``cache_dir`` (a file per kind, config, seed and
    torch/transformers versions) when given. Raises ImportError without torch/transformers."""
    torch, transformers = _require_torch()
    cfg = make_config(kind, **overrides)
    key = (kind, cfg, seed)
    data = _EXPORTS.get(key)
    cached: Path | None = None
    if data is None and cache_dir is not None:
        ident = json.dumps([kind, asdict(cfg), seed, torch.__version__, transformers.__version__], sort_keys=True)
        cached = Path(cache_dir) / f"{kind}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.onnx"
        if cached.exists():
            data = cached.read_bytes()
    if data is None:
        data = _export(kind, cfg, seed)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(cached)
    _EXPORTS[key] = data
    if path is not None:
        Path(path).write_bytes(data)
    return onnx.load_from_string(data)


def _export(kind: str, cfg: Config, seed: int) -> bytes:
    import torch

    module = hf_module(kind, seed=seed, **asdict(cfg))
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        args: tuple[Any, ...] = (torch.randn(2, cfg.channels, cfg.image, cfg.image, generator=gen),)
        names, output = ["pixel_values"], "last_hidden_state"
        axes = {"pixel_values": {0: "B"}, output: {0: "B"}}
    else:
        # Trace with padding so that the mask is built (an all-ones mask may be skipped).
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, 12:] = 0
        args = (torch.randint(0, cfg.vocab, (2, 16), generator=gen), mask)
        names, output = ["input_ids", "attention_mask"], "last_hidden_state" if kind == "bert" else "logits"
        axes = {n: {0: "B", 1: "S"} for n in [*names, output]}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    _tag(model, kind, cfg)
    return model.SerializeToString()
