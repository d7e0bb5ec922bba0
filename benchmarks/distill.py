"""Recovery by fine-tuning on the MNIST CNN: before fine-tune, CE-only, KD, and the spiral.

MNIST from ../shared/data/mnist: the first 8,000 images train (distill holds out nothing: the last
2,000 are the eval set, given as --eval-data), the last 2,000 evaluate. Prints a Markdown table:
teacher accuracy; the student after 50% and 75% channel pruning (l1, global scope off) before
fine-tuning, after CE-only fine-tuning (distill with alpha=1) and after KD fine-tuning (alpha=0.5,
T=4), same epochs; then the spiral to r <= 0.25 of the parameters with at most 1 point lost; and
the time per epoch on this machine.

    pip install -e ".[training,examples]"
    python benchmarks/distill.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, mnist_cnn  # noqa: E402

from graphslim.run import optimize  # noqa: E402

CANON = "fold-batchnorm,eliminate-identity"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    model, eval_npz = mnist_cnn()
    train_npz = RESULTS / "mnist_train.npz"
    e = args.epochs

    def run(pipe: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        rep = optimize(
            model, None, pipeline=pipe, train_data=train_npz, eval_data=eval_npz, measure_latency=False
        ).report
        return rep, time.perf_counter() - t0

    base, _ = run("fold-constants")
    teacher = base["accuracy"]["before"]
    print(
        f"MNIST CNN teacher: {base['before']['params']:,} parameters, accuracy {teacher:.4f} "
        f"(2,000 eval images); fine-tuning on 8,000 images, {e} epochs, batch 64, AdamW lr 1e-3\n"
    )
    print("| student | r (params) | before fine-tune | CE only | KD (alpha=0.5, T=4) | s/epoch (KD) |")
    print("|---|---:|---:|---:|---:|---:|")
    for ratio in (0.5, 0.75):
        prune = f"{CANON},prune-channels{{ratio={ratio}}}"
        raw, _ = run(prune)
        ce, _ = run(f"{prune},distill{{epochs={e},alpha=1.0,patience={e}}}")
        kd, _ = run(f"{prune},distill{{epochs={e},alpha=0.5,temperature=4.0,patience={e}}}")
        spe = next(p for p in kd["passes"] if p["name"] == "distill")["stats"]["seconds_per_epoch"]
        print(
            f"| prune {int(ratio * 100)}% | {raw['compression']['r_params']:.3f} | {raw['accuracy']['after']:.4f} | "
            f"{ce['accuracy']['after']:.4f} | {kd['accuracy']['after']:.4f} | {spe:.2f} |"
        )
    spiral = (
        f'{CANON},spiral{{steps=6,passes="prune-channels{{ratio=0.25}}",distill="distill{{epochs={e}}}",'
        f"target_params=0.25,max_drop=1.0}}"
    )
    rep, seconds = run(spiral)
    st = next(p for p in rep["passes"] if p["name"] == "spiral")["stats"]
    print(
        f"\nspiral (prune 25% of the remaining channels + KD {e} epochs per step, target r <= 0.25, "
        f"max drop 1 point): stopped because: {st['stopped']}; {seconds:.0f} s in all\n"
    )
    print("| step | r (params) | r (MACs) | accuracy | drop (points) |")
    print("|---:|---:|---:|---:|---:|")
    for p in st["curve"]:
        mark = " (rolled back)" if p.get("rolled_back") else ""
        print(
            f"| {p['step']}{mark} | {p['r_params']:.3f} | {p['r_macs']:.3f} | {p['accuracy']:.4f} | "
            f"{p['drop_points']:.2f} |"
        )
    print(
        f"\nfinal: r = {rep['compression']['r_params']:.3f}, accuracy {rep['accuracy']['after']:.4f} "
        f"(teacher {teacher:.4f}, drop {rep['accuracy']['drop_points']:.2f} points)"
    )


if __name__ == "__main__":
    main()
