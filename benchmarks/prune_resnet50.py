"""How long prune-channels takes on a ResNet-50-shaped model (about 25.6M parameters).

The model is built with random weights (tests/models.py's builder; shapes are what matter), with
BatchNorm after every conv, bottleneck blocks [3, 4, 6, 3] and 1x1 projection shortcuts.
Prints median seconds of 3 runs for: load + shape inference, the channel analysis alone,
prune-channels{ratio=0.5} alone, and fold-batchnorm,prune-channels{ratio=0.5} end to end.

    python benchmarks/prune_resnet50.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import ModelBuilder  # noqa: E402

from graphslim.analysis.channels import channel_groups  # noqa: E402
from graphslim.analysis.cost import cost_model  # noqa: E402
from graphslim.core.ir import Graph  # noqa: E402
from graphslim.pipeline import PassContext, PassManager  # noqa: E402


def resnet50() -> onnx.ModelProto:
    b = ModelBuilder("resnet50", (1, 3, 224, 224), seed=0)
    x = b.maxpool(b.relu(b.bn(b.conv("input", 64, k=7, stride=2, bias=False))))
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            y = b.relu(b.bn(b.conv(x, width, k=1, pad=0, bias=False)))
            y = b.relu(b.bn(b.conv(y, width, k=3, stride=stride, bias=False)))
            y = b.bn(b.conv(y, width * 4, k=1, pad=0, bias=False))
            if i == 0:
                x = b.bn(b.conv(x, width * 4, k=1, stride=stride, pad=0, bias=False))
            x = b.relu(b.add(y, x))
    return b.build(b.gemm(b.flatten(b.gap(x)), 1000))


def _median(fn, n: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    model = resnet50()

    def load() -> Graph:
        g = Graph.from_model(model)
        g.infer_shapes()
        return g

    t_load, g = _median(load)
    base = cost_model(g)
    t_an, an = _median(lambda: channel_groups(g))
    prunable = sum(1 for grp in an.groups if grp.prunable)

    def prune(pipeline: str) -> Graph:
        g2 = load()
        PassManager(pipeline).run(g2, PassContext())
        return g2

    t_prune, g_pruned = _median(lambda: prune("prune-channels{ratio=0.5}"))
    t_all, _ = _median(lambda: prune("fold-batchnorm,prune-channels{ratio=0.5}"))
    after = cost_model(g_pruned)
    import tempfile

    from graphslim.run import optimize

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        onnx.save(model, str(path))
        t_e2e, _ = _median(
            lambda: optimize(path, Path(tmp) / "out", pipeline="prune-channels{ratio=0.5}", measure_latency=False), n=1
        )
    print(
        f"ResNet-50-shaped model: {base.params / 1e6:.2f}M params, {base.macs / 1e9:.2f} GMACs, "
        f"{len(an.groups)} channel groups ({prunable} prunable)"
    )
    print("| step | median seconds (3 runs) |\n|---|---:|")
    print(f"| import + shape inference | {t_load:.2f} |")
    print(f"| channel analysis | {t_an:.2f} |")
    print(f"| import + prune-channels{{ratio=0.5}} (incl. re-inferring shapes) | {t_prune:.2f} |")
    print(f"| import + fold-batchnorm,prune-channels{{ratio=0.5}} | {t_all:.2f} |")
    print(f"| graphslim.run from file: load, check, prune, fidelity on 8 random inputs, write | {t_e2e:.2f} |")
    print(
        f"after pruning: {after.params / 1e6:.2f}M params (r = {after.params / base.params:.3f}), "
        f"{after.macs / 1e9:.2f} GMACs"
    )


if __name__ == "__main__":
    main()
