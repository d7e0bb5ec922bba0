"""Small ONNX models for tests, written with onnx.helper (no torch needed).

``ModelBuilder`` tracks shapes so each architecture reads like its PyTorch definition. Weights are
random (fixed seed); BatchNorm statistics are random too, so folding is actually exercised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class ModelBuilder:
    def __init__(
        self,
        name: str,
        in_shape: tuple[int, ...] = (1, 3, 16, 16),
        seed: int = 0,
        opset: int = 13,
        batch: str | int = "N",
    ):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {"input": in_shape}
        self.opset = opset
        self.batch = batch
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape
        return out

    # ---- layers
    def conv(
        self, x: str, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True, pad: int | None = None
    ) -> str:
        n, cin, h, w = self.shapes[x]
        pad = k // 2 if pad is None else pad
        wt = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))).astype(
            np.float32
        )
        inputs = [x, self.const(wt)]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b"))
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return self.node(
            "Conv",
            inputs,
            (n, cout, ho, wo),
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=group,
        )

    def bn(self, x: str) -> str:
        c = self.shapes[x][1]
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),
            r.standard_normal(c) * 0.1,
            r.standard_normal(c) * 0.1,
            r.uniform(0.5, 1.5, c),
        ]
        return self.node(
            "BatchNormalization",
            [x] + [self.const(p.astype(np.float32), "bn") for p in params],
            self.shapes[x],
            epsilon=1e-5,
        )

    def bn_unsqueezed(self, x: str) -> str:
        """BatchNorm as some zoo exports (Caffe2 converters) write it: Mul and Add by per-channel
        vectors reaching them through an Unsqueeze of a 1-D initializer."""
        c = self.shapes[x][1]
        axes = self.const(np.array([1, 2], np.int64), "axes")
        scale = self.node(
            "Unsqueeze", [self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "g"), axes], (c, 1, 1)
        )
        shift = self.node(
            "Unsqueeze", [self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "beta"), axes], (c, 1, 1)
        )
        return self.node("Add", [self.node("Mul", [x, scale], self.shapes[x]), shift], self.shapes[x])

    def shuffle(self, x: str, groups: int) -> str:
        n, c, h, w = self.shapes[x]
        s1 = self.const(np.array([n, groups, c // groups, h, w], np.int64), "shape")
        y = self.node("Reshape", [x, s1], (n, groups, c // groups, h, w))
        y = self.node("Transpose", [y], (n, c // groups, groups, h, w), perm=[0, 2, 1, 3, 4])
        return self.node("Reshape", [y, self.const(np.array([n, c, h, w], np.int64), "shape")], (n, c, h, w))

    def unary(self, op: str, x: str, **attrs) -> str:
        return self.node(op, [x], self.shapes[x], **attrs)

    def relu(self, x: str) -> str:
        return self.unary("Relu", x)

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], self.shapes[a])

    def mul_const(self, x: str, value: np.ndarray) -> str:
        return self.node("Mul", [x, self.const(value.astype(np.float32), "k")], self.shapes[x])

    def concat(self, xs: list[str], axis: int = 1) -> str:
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        return self.node("Concat", xs, tuple(shape), axis=axis)

    def maxpool(self, x: str, k: int = 2) -> str:
        n, c, h, w = self.shapes[x]
        return self.node("MaxPool", [x], (n, c, h // k, w // k), kernel_shape=[k, k], strides=[k, k])

    def gap(self, x: str) -> str:
        n, c = self.shapes[x][:2]
        return self.node("GlobalAveragePool", [x], (n, c, 1, 1))

    def flatten(self, x: str) -> str:
        s = self.shapes[x]
        return self.node("Flatten", [x], (s[0], int(np.prod(s[1:]))), axis=1)

    def reshape_flat(self, x: str) -> str:
        s = self.shapes[x]
        shape = self.const(np.array([-1, int(np.prod(s[1:]))], dtype=np.int64), "shape")
        return self.node("Reshape", [x, shape], (s[0], int(np.prod(s[1:]))))

    def gemm(self, x: str, nout: int, trans_b: bool = True) -> str:
        n, k = self.shapes[x]
        w = (self.rng.standard_normal((nout, k) if trans_b else (k, nout)) * np.sqrt(1.0 / k)).astype(np.float32)
        b = self.rng.standard_normal(nout).astype(np.float32) * 0.1
        return self.node("Gemm", [x, self.const(w), self.const(b, "b")], (n, nout), transB=int(trans_b))

    def matmul(self, x: str, nout: int) -> str:
        s = self.shapes[x]
        w = (self.rng.standard_normal((s[-1], nout)) * np.sqrt(1.0 / s[-1])).astype(np.float32)
        return self.node("MatMul", [x, self.const(w)], s[:-1] + (nout,))

    def bias_add(self, x: str) -> str:
        n = self.shapes[x][-1]
        return self.node(
            "Add", [x, self.const(self.rng.standard_normal(n).astype(np.float32) * 0.1, "b")], self.shapes[x]
        )

    def build(self, *outputs: str) -> onnx.ModelProto:
        def vi(name: str) -> onnx.ValueInfoProto:
            shape = list(self.shapes[name])
            shape[0] = self.batch
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

        graph = helper.make_graph(
            self.nodes, self.name, [vi("input")], [vi(o) for o in outputs], initializer=self.inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tests")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------- architectures


def plain_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu x2, MaxPool, Flatten -> Gemm -> Gemm."""
    b = ModelBuilder("plain_cnn", (1, 3, 16, 16), seed)
    x = b.relu(b.bn(b.conv("input", 16, bias=False)))
    x = b.maxpool(b.relu(b.bn(b.conv(x, 32))))
    x = b.maxpool(x)
    x = b.relu(b.gemm(b.flatten(x), 64))
    return b.build(b.gemm(x, 10))


def resnet(seed: int = 0) -> onnx.ModelProto:
    """Stem, an identity residual block, a strided block with a 1x1 projection shortcut, GAP, Gemm."""
    b = ModelBuilder("resnet", (1, 3, 16, 16), seed)
    x = b.relu(b.bn(b.conv("input", 16, bias=False)))
    y = b.relu(b.bn(b.conv(x, 16, bias=False)))
    y = b.bn(b.conv(y, 16, bias=False))
    x = b.relu(b.add(y, x))
    y = b.relu(b.bn(b.conv(x, 32, stride=2, bias=False)))
    y = b.bn(b.conv(y, 32, bias=False))
    s = b.bn(b.conv(x, 32, k=1, stride=2, bias=False, pad=0))
    x = b.relu(b.add(y, s))
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def densenet(seed: int = 0) -> onnx.ModelProto:
    """Dense block: each layer's output is concatenated to its input; transition 1x1 conv."""
    b = ModelBuilder("densenet", (1, 3, 16, 16), seed)
    x = b.relu(b.bn(b.conv("input", 16)))
    for _ in range(3):
        y = b.relu(b.bn(b.conv(x, 8)))
        x = b.concat([x, y])
    x = b.maxpool(b.relu(b.bn(b.conv(x, 24, k=1, pad=0))))
    return b.build(b.gemm(b.reshape_flat(b.maxpool(x)), 10))


def inception(seed: int = 0) -> onnx.ModelProto:
    """Parallel 1x1 / 3x3 / 5x5 / pool branches concatenated, twice."""
    b = ModelBuilder("inception", (1, 3, 16, 16), seed)
    x = b.relu(b.conv("input", 16))
    for width in (8, 12):
        b1 = b.relu(b.conv(x, width, k=1, pad=0))
        b2 = b.relu(b.conv(b.relu(b.conv(x, width, k=1, pad=0)), width, k=3))
        b3 = b.relu(b.conv(b.relu(b.conv(x, width // 2, k=1, pad=0)), width, k=5))
        pooled = b.node("MaxPool", [x], b.shapes[x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        b4 = b.relu(b.conv(pooled, width, k=1, pad=0))
        x = b.concat([b1, b2, b3, b4])
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """Inverted residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project, residual Add; Clip as ReLU6."""
    b = ModelBuilder("mobilenetv2", (1, 3, 16, 16), seed)

    def relu6(x: str) -> str:
        lo, hi = b.const(np.array(0, np.float32), "lo"), b.const(np.array(6, np.float32), "hi")
        return b.node("Clip", [x, lo, hi], b.shapes[x])

    x = relu6(b.bn(b.conv("input", 16, bias=False)))
    for cout, stride in ((16, 1), (24, 2), (24, 1)):
        cin = b.shapes[x][1]
        y = relu6(b.bn(b.conv(x, cin * 4, k=1, pad=0, bias=False)))
        y = relu6(b.bn(b.conv(y, cin * 4, k=3, stride=stride, group=cin * 4, bias=False)))
        y = b.bn(b.conv(y, cout, k=1, pad=0, bias=False))
        x = b.add(y, x) if stride == 1 and cin == cout else y
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def grouped(seed: int = 0) -> onnx.ModelProto:
    """ResNeXt-style: 1x1, grouped 3x3 (4 groups), 1x1, residual."""
    b = ModelBuilder("grouped", (1, 3, 16, 16), seed)
    x = b.relu(b.bn(b.conv("input", 32, bias=False)))
    y = b.relu(b.bn(b.conv(x, 32, k=1, pad=0, bias=False)))
    y = b.relu(b.bn(b.conv(y, 32, k=3, group=4, bias=False)))
    y = b.bn(b.conv(y, 32, k=1, pad=0, bias=False))
    x = b.relu(b.add(y, x))
    x = b.relu(b.conv(x, 48, k=3, group=4))
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def squeezenet(seed: int = 0) -> onnx.ModelProto:
    """Two Fire modules: squeeze 1x1, expand 1x1 and 3x3 concatenated."""
    b = ModelBuilder("squeezenet", (1, 3, 16, 16), seed)
    x = b.maxpool(b.relu(b.conv("input", 32)))
    for s, e in ((8, 16), (12, 24)):
        sq = b.relu(b.conv(x, s, k=1, pad=0))
        x = b.concat([b.relu(b.conv(sq, e, k=1, pad=0)), b.relu(b.conv(sq, e, k=3))])
    x = b.conv(x, 10, k=1, pad=0)
    return b.build(b.flatten(b.gap(x)))


def mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul + Add + Relu chain, as exporters write Linear layers."""
    b = ModelBuilder("mlp", (1, 32), seed)
    x = "input"
    for width in (64, 48):
        x = b.relu(b.bias_add(b.matmul(x, width)))
    return b.build(b.bias_add(b.matmul(x, 10)))


def densenet_zoo(seed: int = 0) -> onnx.ModelProto:
    """DenseNet as zoo exports write it: BN-ReLU-Conv pre-activation layers whose BatchNorm is a
    Mul/Add by Unsqueezed initializers, dense concatenations, a transition."""
    b = ModelBuilder("densenet_zoo", (1, 3, 16, 16), seed, batch=1)
    x = b.conv("input", 16)
    for block in range(2):
        for _ in range(3):
            y = b.conv(b.relu(b.bn_unsqueezed(x)), 16, k=1, pad=0)  # bottleneck
            y = b.conv(b.relu(b.bn_unsqueezed(y)), 8)
            x = b.concat([x, y])
        if block == 0:
            x = b.node(
                "AveragePool",
                [b.conv(b.relu(b.bn_unsqueezed(x)), 24, k=1, pad=0)],
                (1, 24, 8, 8),
                kernel_shape=[2, 2],
                strides=[2, 2],
            )
    x = b.relu(b.bn_unsqueezed(x))
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def inception_zoo(seed: int = 0) -> onnx.ModelProto:
    """Inception v2 as zoo exports write it: Conv then BatchNorm as Mul/Add by Unsqueezed
    initializers, four branches concatenated."""
    b = ModelBuilder("inception_zoo", (1, 3, 16, 16), seed, batch=1)

    def cbr(x: str, c: int, k: int = 1) -> str:
        return b.relu(b.bn_unsqueezed(b.conv(x, c, k=k, pad=k // 2, bias=False)))

    x = cbr("input", 16, 3)
    for width in (8, 12):
        b1 = cbr(x, width)
        b2 = cbr(cbr(x, width), width, 3)
        b3 = cbr(cbr(cbr(x, width // 2), width, 3), width, 3)
        pooled = b.node("AveragePool", [x], b.shapes[x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        b4 = cbr(pooled, width)
        x = b.concat([b1, b2, b3, b4])
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def shufflenet_v1(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet v1 units: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1, residual Add
    (and a strided unit concatenating an average-pooled shortcut)."""
    b = ModelBuilder("shufflenet_v1", (1, 3, 16, 16), seed, batch=1)
    g = 2
    x = b.relu(b.bn(b.conv("input", 24)))
    for stride in (1, 2, 1):
        cin = b.shapes[x][1]
        mid = 16
        y = b.relu(b.bn(b.conv(x, mid, k=1, pad=0, group=g, bias=False)))
        y = b.shuffle(y, g)
        y = b.bn(b.conv(y, mid, k=3, stride=stride, group=mid, bias=False))
        if stride == 1:
            y = b.bn(b.conv(y, cin, k=1, pad=0, group=g, bias=False))
            x = b.relu(b.add(y, x))
        else:
            y = b.bn(b.conv(y, cin, k=1, pad=0, group=g, bias=False))
            n, c, h, w = b.shapes[x]
            sc = b.node(
                "AveragePool", [x], (n, c, h // 2, w // 2), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
            )
            x = b.relu(b.concat([sc, y]))
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def shufflenet_v2(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet v2 units: split the channels in half, 1x1-dw3x3-1x1 on one half, concatenate,
    channel shuffle."""
    b = ModelBuilder("shufflenet_v2", (1, 3, 16, 16), seed, batch=1)
    x = b.relu(b.bn(b.conv("input", 32)))
    for _ in range(3):
        n, c, h, w = b.shapes[x]
        half = (n, c // 2, h, w)
        split = b._name("split")
        sizes = b.const(np.array([c // 2, c // 2], np.int64), "sizes")
        b.nodes.append(helper.make_node("Split", [x, sizes], [split + "_a", split + "_b"], name=split, axis=1))
        b.shapes[split + "_a"] = b.shapes[split + "_b"] = half
        y = b.relu(b.bn(b.conv(split + "_b", 24, k=1, pad=0, bias=False)))
        y = b.bn(b.conv(y, 24, k=3, group=24, bias=False))
        y = b.relu(b.bn(b.conv(y, c // 2, k=1, pad=0, bias=False)))
        x = b.shuffle(b.concat([split + "_a", y]), 2)
    return b.build(b.gemm(b.flatten(b.gap(b.relu(b.conv(x, 48, k=1, pad=0)))), 10))


ZOO_STYLE: dict[str, Callable[..., onnx.ModelProto]] = {
    "densenet_zoo": densenet_zoo,
    "inception_zoo": inception_zoo,
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
}


ARCHITECTURES: dict[str, Callable[..., onnx.ModelProto]] = {
    "plain_cnn": plain_cnn,
    "resnet": resnet,
    "densenet": densenet,
    "inception": inception,
    "mobilenetv2": mobilenetv2,
    "grouped": grouped,
    "squeezenet": squeezenet,
    "mlp": mlp,
}


def sample_inputs(model: onnx.ModelProto, n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else n for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def mlp_with_data(folder, n_train: int, n_eval: int):
    """The MLP saved as ``folder/mlp.onnx`` with unlabelled standard-normal train and eval sets
    (``train.npz``, ``eval.npz``, seeded); returns the three paths."""
    from pathlib import Path

    folder = Path(folder)
    model = ARCHITECTURES["mlp"]()
    path = folder / "mlp.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    np.savez(folder / "train.npz", input=rng.standard_normal((n_train, k)).astype(np.float32))
    np.savez(folder / "eval.npz", input=rng.standard_normal((n_eval, k)).astype(np.float32))
    return path, folder / "train.npz", folder / "eval.npz"


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
