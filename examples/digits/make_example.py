"""Train the bundled example: a small CNN on scikit-learn's digits data set (8x8 images, 10 classes).

Writes ``model.onnx`` (opset 13, dynamic batch) and ``data.npz`` (the 497 held-out images as
``input`` and their ``labels``) beside this script. Needs the ``examples`` extra
(``pip install -e .[examples]``: scikit-learn and the CPU build of torch 2.13.0).

The ONNX graph is written with onnx.helper from the trained weights rather than with
torch.onnx.export, so the example has a fixed, readable structure (Conv-BatchNorm-Relu blocks, a
residual Add, MaxPool, Flatten, Gemm, Dropout) that does not change with the exporter's version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)) + x)  # residual block
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.drop(x))


def train() -> tuple[Net, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]
    torch.manual_seed(SEED)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(30):
        net.train()
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"held-out accuracy (torch): {acc:.4f}")
    return net, x_test, y_test


def to_onnx(net: Net) -> onnx.ModelProto:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    inits = [numpy_helper.from_array(v, k) for k, v in sd.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 32 * 4 * 4], dtype=np.int64), "flat_shape"))

    def bn(i: int, x: str) -> onnx.NodeProto:
        p = f"b{i}"
        return helper.make_node(
            "BatchNormalization",
            [x, f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var"],
            [f"bn{i}"],
            name=f"bn{i}",
            epsilon=1e-5,
        )

    nodes = [
        helper.make_node("Conv", ["input", "c1.weight"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        bn(1, "conv1"),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "c2.weight"], ["conv2"], name="conv2", pads=[1, 1, 1, 1]),
        bn(2, "conv2"),
        helper.make_node("Relu", ["bn2"], ["relu2"], name="relu2"),
        helper.make_node("Conv", ["relu2", "c3.weight"], ["conv3"], name="conv3", pads=[1, 1, 1, 1]),
        bn(3, "conv3"),
        helper.make_node("Add", ["bn3", "relu2"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["relu3"], name="relu3"),
        helper.make_node("MaxPool", ["relu3"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu4"], name="relu4"),
        helper.make_node("Dropout", ["relu4"], ["drop"], name="dropout"),
        helper.make_node("Gemm", ["drop", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="graphslim-example")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    net, x_test, y_test = train()
    model = to_onnx(net)
    onnx.save(model, HERE / "model.onnx")
    np.savez_compressed(HERE / "data.npz", input=x_test, labels=y_test)
    import onnxruntime as ort

    out = ort.InferenceSession(str(HERE / "model.onnx")).run(None, {"input": x_test})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    print(
        f"held-out accuracy (onnxruntime): {(out.argmax(1) == y_test).mean():.4f}; "
        f"max |onnx - torch| = {np.abs(out - ref).max():.2e}"
    )


if __name__ == "__main__":
    main()
