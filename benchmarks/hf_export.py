"""Small random-weight Hugging Face transformers exported to ONNX the way users export them.

BERT, ViT, GPT-2 and a Llama-style decoder (grouped-query attention: 2 key/value heads for 4
query heads), hidden 64, 2 layers, 4 heads, random weights (nothing is fetched from a hub),
exported with the TorchScript exporter (``torch.onnx.export(dynamo=False, opset_version=17)``)
with symbolic batch and sequence dimensions, IR version 9 (what ONNX Runtime 1.19 loads).
Attention is ``eager``: the sdpa path traces wrongly. Each model is called with keyword
arguments inside a small wrapper (newer ``forward`` signatures take more positional arguments).

    pip install -e ".[examples]" transformers
    python benchmarks/hf_export.py OUT_DIR [--models bert,vit,gpt2,llama] [--sequence N]

Writes ``OUT_DIR/<name>.onnx`` for each model and prints the input names and shapes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODELS = ("bert", "vit", "gpt2", "llama")
HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 100
IMAGE, PATCH = 32, 8


def _wrap(model: Any, kind: str) -> Any:
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            if kind == "vit":
                return self.model(pixel_values=inputs[0]).last_hidden_state
            if kind == "bert":
                return self.model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
            return self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False).logits

    return Wrapper().eval()


def build(kind: str, sequence: int | None = None) -> tuple[Any, tuple[Any, ...], list[str], dict[str, dict[int, str]]]:
    """(wrapped model, example inputs, input names, dynamic axes) for ``kind``; with ``sequence``,
    only the batch dimension is symbolic (text models traced at that sequence length)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 4 * HIDDEN,
        "attn_implementation": "eager",
    }
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, **common))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, **common))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB,
                n_positions=128,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=HEADS,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation="eager",
            )
        )
    elif kind == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=128, num_key_value_heads=2, **common)
        )
    else:
        raise ValueError(f"unknown model {kind!r} (models: {', '.join(MODELS)})")
    model.eval()
    if kind == "vit":
        return (
            _wrap(model, kind),
            (torch.randn(2, 3, IMAGE, IMAGE),),
            ["pixel_values"],
            {"pixel_values": {0: "batch"}, "output": {0: "batch"}},
        )
    ids = torch.randint(0, VOCAB, (2, sequence or 8))
    mask = torch.ones(2, sequence or 8, dtype=torch.int64)
    seq = {0: "batch"} if sequence else {0: "batch", 1: "sequence"}
    return (
        _wrap(model, kind),
        (ids, mask),
        ["input_ids", "attention_mask"],
        {"input_ids": seq, "attention_mask": seq, "output": seq},
    )


def export(kind: str, path: Path, sequence: int | None = None) -> Path:
    """Export ``kind`` to ``path`` (opset 17, IR version 9); ``sequence`` as in :func:`build`."""
    import onnx
    import torch

    model, args, names, axes = build(kind, sequence)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
        )
    m = onnx.load(str(path))
    m.ir_version = 9  # ONNX Runtime 1.19 loads IR <= 10
    onnx.save(m, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sequence", type=int, help="a static sequence length (only the batch stays symbolic)")
    args = ap.parse_args()
    import onnx

    for kind in args.models.split(","):
        path = export(kind, args.out / f"{kind}.onnx", args.sequence)
        m = onnx.load(str(path))
        shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        print(f"{path}: {len(m.graph.node)} nodes, inputs {shapes}")


if __name__ == "__main__":
    main()
