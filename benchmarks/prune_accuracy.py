"""Accuracy after prune-channels, before any fine-tuning, for each criterion and ratio.

Models: the bundled digits example (evaluated on its 497 held-out images) and the MNIST CNN
(trained on the first 8,000 images of ../shared/data/mnist, evaluated on the last 2,000).
Prints a Markdown table: ratio, criterion, r (parameters kept), MACs kept, accuracy.

    pip install -e ".[examples]"    # torch, to train the MNIST CNN once
    python benchmarks/prune_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import example_and_mnist  # noqa: E402

from graphslim.run import optimize  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
CRITERIA = ("l1", "l2", "bn-gamma", "random")


def main() -> None:
    models = example_and_mnist()
    for title, (model, data) in models.items():
        base = optimize(model, None, pipeline="fold-constants", data=data, measure_latency=False).report
        print(
            f"\n### {title}: {base['before']['params']:,} parameters, accuracy {base['accuracy']['before']:.4f} "
            f"on {base['accuracy']['samples']} images\n"
        )
        print("| ratio | criterion | r (params) | MACs kept | accuracy | drop (points) |")
        print("|---:|---|---:|---:|---:|---:|")
        for ratio in RATIOS:
            for crit in CRITERIA:
                # bn-gamma needs the BatchNorms, so it prunes before folding; the others fold first.
                pipe = (
                    f"prune-channels{{ratio={ratio},criterion={crit}}},fold-batchnorm,eliminate-identity"
                    if crit == "bn-gamma"
                    else f"fold-batchnorm,eliminate-identity,prune-channels{{ratio={ratio},criterion={crit}}}"
                )
                rep = optimize(model, None, pipeline=pipe, data=data, measure_latency=False).report
                prune = next(p for p in rep["passes"] if p["name"] == "prune-channels")
                n_fb = prune["stats"].get("criterion_fallbacks_to_l1", 0)
                note = f" (l1 for {n_fb} of {prune['stats']['prunable_groups']} groups: no BatchNorm)" if n_fb else ""
                acc = rep["accuracy"]
                print(
                    f"| {ratio} | {crit}{note} | {rep['compression']['r_params']:.3f} | "
                    f"{rep['compression']['r_macs']:.3f} | {acc['after']:.4f} | {acc['drop_points']:.2f} |"
                )


if __name__ == "__main__":
    main()
