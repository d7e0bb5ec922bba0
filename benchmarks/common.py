"""Shared pieces of the benchmark scripts: data sets, the MNIST CNN, accuracy and latency.

MNIST comes from ../shared/data/mnist (the 10,000-image test split in IDX format): the first
8,000 images train, the last 2,000 evaluate. The MNIST CNN (the architecture of the benchmark
issue: Conv(1->32,5x5)-ReLU-MaxPool-Conv(32->64,3x3)-ReLU-MaxPool-Flatten-Dense(256)-ReLU-
Dense(128)-ReLU-Dense(10)) is trained here with torch 2.13.0 CPU (``pip install -e .[examples]``)
and cached in benchmarks/results/.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
EXAMPLE = ROOT / "examples" / "digits"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_eval, y_eval): 8,000 / 2,000 images of the MNIST test split, [N,1,28,28] in [0,1]."""
    if not MNIST_DIR.is_dir():
        raise SystemExit(f"MNIST not found at {MNIST_DIR}")
    x = (_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)[:, None]
    y = _idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return x[:8000], y[:8000], x[8000:], y[8000:]


def sequential_to_onnx(layers: list, input_shape: tuple[int, ...], name: str) -> onnx.ModelProto:
    """An ONNX graph (opset 13, dynamic batch) for a torch nn.Sequential of Conv2d, ReLU,
    MaxPool2d, Flatten, Linear and BatchNorm2d, written with onnx.helper from the weights."""
    import torch.nn as nn

    nodes, inits, x, i = [], [], "input", 0
    for layer in layers:
        i += 1
        out = f"{type(layer).__name__.lower()}{i}"
        if isinstance(layer, nn.Conv2d):
            w = f"{out}.weight"
            inits.append(numpy_helper.from_array(layer.weight.detach().numpy(), w))
            ins = [x, w]
            if layer.bias is not None:
                inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), f"{out}.bias"))
                ins.append(f"{out}.bias")
            p = layer.padding[0]
            nodes.append(
                helper.make_node(
                    "Conv",
                    ins,
                    [out],
                    name=out,
                    kernel_shape=list(layer.kernel_size),
                    strides=list(layer.stride),
                    pads=[p] * 4,
                    group=layer.groups,
                )
            )
        elif isinstance(layer, nn.BatchNorm2d):
            names = [f"{out}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            for n, t in zip(names, (layer.weight, layer.bias, layer.running_mean, layer.running_var), strict=True):
                inits.append(numpy_helper.from_array(t.detach().numpy(), n))
            nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], name=out, epsilon=layer.eps))
        elif isinstance(layer, nn.ReLU):
            nodes.append(helper.make_node("Relu", [x], [out], name=out))
        elif isinstance(layer, nn.MaxPool2d):
            k = layer.kernel_size
            nodes.append(helper.make_node("MaxPool", [x], [out], name=out, kernel_shape=[k, k], strides=[k, k]))
        elif isinstance(layer, nn.Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], name=out, axis=1))
        elif isinstance(layer, nn.Linear):
            inits.append(numpy_helper.from_array(layer.weight.detach().numpy(), f"{out}.weight"))
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), f"{out}.bias"))
            nodes.append(helper.make_node("Gemm", [x, f"{out}.weight", f"{out}.bias"], [out], name=out, transB=1))
        else:
            raise TypeError(f"unsupported layer {layer}")
        x = out
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="graphslim-benchmarks")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mnist_cnn(epochs: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Train (or reuse) the MNIST CNN; returns (model.onnx, eval.npz) paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_path, data_path = RESULTS / "mnist_cnn.onnx", RESULTS / "mnist_eval.npz"
    train_path = RESULTS / "mnist_train.npz"
    x_tr, y_tr, x_ev, y_ev = mnist()
    if not data_path.exists():
        np.savez_compressed(data_path, input=x_ev, labels=y_ev)
        np.savez_compressed(train_path, input=x_tr, labels=y_tr)
    if model_path.exists():
        return model_path, data_path
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    onnx.save(sequential_to_onnx(list(net), (1, 28, 28), "mnist_cnn"), str(model_path))
    return model_path, data_path


def digits_example() -> tuple[Path, Path]:
    return EXAMPLE / "model.onnx", EXAMPLE / "data.npz"


def example_and_mnist() -> dict[str, tuple[Path, Path]]:
    """The bundled example and, where ../shared/data/mnist exists, the MNIST CNN: (model, eval data)."""
    models = {"digits CNN (bundled example)": digits_example()}
    try:
        models["MNIST CNN"] = mnist_cnn()
    except SystemExit as e:
        print(f"skipping MNIST: {e}")
    return models


def resnet_cifar(seed: int = 0) -> tuple[Path, Path]:
    """A ResNet-style CIFAR-sized network (3x32x32, 3 stages of 2 basic blocks, 16/32/64 channels,
    BatchNorm, projection shortcuts) with random weights, and 512 synthetic inputs (no labels):
    for latency and fidelity, not accuracy."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from models import ModelBuilder

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_path, data_path = RESULTS / "resnet_cifar.onnx", RESULTS / "resnet_cifar_inputs.npz"
    if model_path.exists() and data_path.exists():
        return model_path, data_path
    b = ModelBuilder("resnet_cifar", (1, 3, 32, 32), seed)
    x = b.relu(b.bn(b.conv("input", 16, bias=False)))
    for stage, width in enumerate((16, 32, 64)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = b.relu(b.bn(b.conv(x, width, stride=stride, bias=False)))
            y = b.bn(b.conv(y, width, bias=False))
            if stride != 1 or b.shapes[x][1] != width:
                x = b.bn(b.conv(x, width, k=1, stride=stride, pad=0, bias=False))
            x = b.relu(b.add(y, x))
    model = b.build(b.gemm(b.flatten(b.gap(x)), 10))
    onnx.save(model, str(model_path))
    rng = np.random.default_rng(seed)
    np.savez_compressed(data_path, input=rng.standard_normal((512, 3, 32, 32)).astype(np.float32))
    return model_path, data_path


def measure(model: onnx.ModelProto, data, batches: tuple[int, ...] = (1, 32)) -> dict[int, float]:
    """Median ORT latency (ms) per batch size, 200 runs or 10 s at most each."""
    from graphslim.backend.bench import measure_ort

    return {b: measure_ort(model, data, batch=b, repeat=200, max_seconds=10)["median_ms"] for b in batches}


def has_training() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401

        return True
    except ImportError:
        return False
