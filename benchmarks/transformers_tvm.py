"""Compile small Hugging Face transformers with the TVM backend and compare them with ONNX Runtime.

Exports BERT, ViT, GPT-2 and a Llama-style decoder (``tests/transformer_models.export_hf``: random
weights, hidden 64, 2 layers, 4 heads, symbolic batch and sequence), compiles each with ``graphslim compile``'s code
path (``graphslim.backend.compile_model``, ``--shape``) at each batch size, runs the artifact on
seeded inputs (text: random token ids, attention masks with right padding) and prints the
largest deviation from ONNX Runtime relative to the output's largest magnitude, and the time
each compile took.

    pip install -e ".[ort,tvm,examples]" transformers
    python benchmarks/transformers_tvm.py [--models bert,vit,gpt2,llama] [--batches 1,16] [--sequence 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformer_models as tm  # noqa: E402


def check(kind: str, path: Path, batch: int, sequence: int, out: Path) -> dict[str, float]:
    """Compile ``path`` at ``batch`` (and ``sequence``), run it and ONNX Runtime on the same inputs."""
    import onnx
    import onnxruntime as ort

    from graphslim.backend import compile_model, load_artifact
    from graphslim.core.metrics import compare_outputs

    feeds = tm.sample_inputs_for(onnx.load(str(path)), batch=batch, seq=sequence)
    shapes = {name: list(v.shape) for name, v in feeds.items()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    t0 = time.perf_counter()
    compile_model(onnx.load(str(path)), "x86", out, shapes=shapes)
    seconds = time.perf_counter() - t0
    got = load_artifact(out)(feeds)
    fid = compare_outputs(ref, got)
    return {"max_rel": fid.max_rel_diff, "max_abs": fid.max_abs_diff, "compile_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert,vit,gpt2,llama")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--sequence", type=int, default=16)
    ap.add_argument("--models-dir", type=Path, help="reuse exports here (written if missing)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graphslim-hf-") as tmp:
        folder = args.models_dir or Path(tmp)
        print(f"{'model':<6} {'batch':>5} {'max rel':>10} {'max abs':>10} {'compile s':>9}")
        for kind in args.models.split(","):
            path = folder / f"{kind}.onnx"
            if not path.exists():
                tm.export_hf(kind, path)
            for batch in (int(b) for b in args.batches.split(",")):
                r = check(kind, path, batch, args.sequence, Path(tmp) / f"{kind}-{batch}")
                print(
                    f"{kind:<6} {batch:>5} {r['max_rel']:>10.2e} {r['max_abs']:>10.2e} {r['compile_s']:>9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
