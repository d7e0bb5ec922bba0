"""The TVM backend on transformer graphs: static shapes from ``--shape``, shape subgraphs folded to
a fixed point before import, no layout conversion on conv-free graphs, importer traps (variadic
Sum/Max, unbounded gathers) removed, and the compression kernels on N-D (3-D) MatMuls.

A transformer block written with onnx.helper (the way PyTorch exports one: computed Reshape
targets, Add(bias, MatMul), Erf GELU, LayerNormalization, an attention mask) always runs; the
Hugging Face models (BERT, ViT, GPT-2, a Llama-style decoder with grouped-query attention) need
torch and transformers. Outputs are compared with ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphslim.kernels.prepare import fix_shapes, parse_shape, prepare
from onnx import TensorProto, helper, numpy_helper

from graphslim.core.errors import InputError

D, HEADS, FFN, VOCAB = 32, 4, 64, 50


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _max_rel(ref: np.ndarray, got: np.ndarray) -> float:
    assert ref.shape == got.shape
    return float(np.max(np.abs(ref.astype(np.float64) - got)) / np.max(np.abs(ref)))


class _Block:
    """An onnx.helper graph builder with fresh names and seeded weights."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, value: np.ndarray | list, dtype: type = np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, *inputs: str, **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def linear(self, x: str, k: int, n: int) -> str:
        """MatMul + Add(bias, y), the order PyTorch exports it in."""
        w = self.const(self.rng.standard_normal((k, n)) / np.sqrt(k))
        return self.op("Add", self.const(self.rng.standard_normal(n) * 0.1), self.op("MatMul", x, w))

    def layer_norm(self, x: str) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.const(1 + 0.1 * self.rng.standard_normal(D)),
            self.const(0.1 * self.rng.standard_normal(D)),
            axis=-1,
            epsilon=1e-5,
        )

    def model(self, inputs: list[onnx.ValueInfoProto], out: str, out_shape: list) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "block", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        onnx.checker.check_model(m, full_check=True)
        return m


def transformer_block(seed: int = 0) -> onnx.ModelProto:
    """Embedding + one post-norm encoder layer, shaped like a PyTorch export: inputs ``input_ids``
    and ``attention_mask`` [batch, sequence] (symbolic), head reshapes computed from
    Shape -> Gather -> Unsqueeze -> Concat, scores + (1 - mask) * -10000, Softmax, Erf GELU."""
    b = _Block(seed)
    hd = D // HEADS
    x = b.op("Gather", b.const(b.rng.standard_normal((VOCAB, D)) * 0.5), "input_ids", axis=0)
    x = b.layer_norm(x)
    shape = b.op("Shape", x)
    batch = b.op("Unsqueeze", b.op("Gather", shape, b.const(0, np.int64), axis=0), b.const([0], np.int64))
    seq = b.op("Unsqueeze", b.op("Gather", shape, b.const(1, np.int64), axis=0), b.const([0], np.int64))
    heads = b.op("Concat", batch, seq, b.const([HEADS], np.int64), b.const([hd], np.int64), axis=0)

    def split(t: str, perm: list[int]) -> str:
        return b.op("Transpose", b.op("Reshape", t, heads), perm=perm)

    q = split(b.linear(x, D, D), [0, 2, 1, 3])
    k = split(b.linear(x, D, D), [0, 2, 3, 1])
    v = split(b.linear(x, D, D), [0, 2, 1, 3])
    scores = b.op("Div", b.op("MatMul", q, k), b.const(np.sqrt(hd)))
    mask = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const([1, 2], np.int64)), to=TensorProto.FLOAT)
    scores = b.op("Add", scores, b.op("Mul", b.op("Sub", b.const(1.0), mask), b.const(-10000.0)))
    ctx = b.op("Transpose", b.op("MatMul", b.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
    merged = b.op("Concat", batch, seq, b.const([D], np.int64), axis=0)
    x = b.layer_norm(b.op("Add", x, b.linear(b.op("Reshape", ctx, merged), D, D)))
    h = b.linear(x, D, FFN)
    gelu = b.op(
        "Mul",
        b.op("Mul", h, b.const(0.5)),
        b.op("Add", b.const(1.0), b.op("Erf", b.op("Div", h, b.const(np.sqrt(2.0))))),
    )
    out = b.layer_norm(b.op("Add", x, b.linear(gelu, FFN, D)))
    seq_inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask")
    ]
    return b.model(seq_inputs, out, ["batch", "sequence", D])


def block_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, batch)
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": (np.arange(seq)[None] < lengths[:, None]).astype(np.int64),
    }


# ---------------------------------------------------------------- shapes (no TVM needed)


def test_shape_options_parse():
    assert parse_shape("input_ids=1x128") == ("input_ids", [1, 128])
    assert parse_shape("x=2,3,4") == ("x", [2, 3, 4])
    for bad in ("input_ids", "=1x2", "x=1xa", "x=0x3"):
        with pytest.raises(InputError):
            parse_shape(bad)


def test_named_dimensions_bind_across_inputs_and_unbound_ones_are_named():
    model = transformer_block()
    fixed, batch = fix_shapes(model, {"input_ids": [3, 8]})
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in fixed.graph.input}
    assert dims == {"input_ids": [3, 8], "attention_mask": [3, 8]} and batch == 3
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == [3, 8, D]
    with pytest.raises(InputError, match=r"input_ids\[1\] \('sequence'\), attention_mask\[1\] \('sequence'\)"):
        fix_shapes(model, None, 4)
    with pytest.raises(InputError, match="--batch 2 conflicts"):
        fix_shapes(model, {"input_ids": [3, 8]}, 2)
    with pytest.raises(InputError, match="'sequence' is 8"):
        fix_shapes(model, {"input_ids": [3, 8], "attention_mask": [3, 9]})
    with pytest.raises(InputError, match="names no model input: nope"):
        fix_shapes(model, {"nope": [1]})
    with pytest.raises(InputError, match="rank 2"):
        fix_shapes(model, {"input_ids": [3, 8, 1]})


def test_shape_subgraphs_fold_away_once_shapes_are_static():
    """Fixing the shapes first lets canonicalization fold every Shape -> Gather -> Concat chain
    (repeated to a fixed point); the result still matches the original in ONNX Runtime."""
    model = transformer_block()
    prepared, batch = prepare(model, {"input_ids": [2, 8]})
    ops = [n.op_type for n in prepared.graph.node]
    inits = {i.name for i in prepared.graph.initializer}
    assert batch == 2 and "Shape" not in ops and "Concat" not in ops
    assert all(n.input[1] in inits for n in prepared.graph.node if n.op_type == "Reshape")
    feeds = block_feeds(2, 8)
    np.testing.assert_allclose(_ort(prepared, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_variadic_sum_and_mean_become_add_chains():
    from graphslim.kernels.prepare import split_variadic

    b = _Block()
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "abc"]
    s = b.op("Sum", "a", "b", "c")
    out = b.op("Mean", s, "a", b.const(np.ones(3, np.float32)))
    model = b.model(ins, b.op("Sum", out), [2, 3])
    split, count = split_variadic(model)
    assert count == 3 and {n.op_type for n in split.graph.node} == {"Add", "Div", "Identity"}
    feeds = {n: np.random.default_rng(i).standard_normal((2, 3)).astype(np.float32) for i, n in enumerate("abc")}
    np.testing.assert_allclose(_ort(split, feeds)[0], _ort(model, feeds)[0], rtol=1e-6)


# ---------------------------------------------------------------- compile and run (TVM)

needs_tvm = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("tvm") is None, reason="needs the tvm extra (apache-tvm)"
)


def _compile_and_run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path, **options: object
) -> tuple[list[np.ndarray], dict]:
    from graphslim.backend import compile_model, host_cpu_flags, load_artifact

    art = compile_model(model, "x86", tmp_path, shapes={k: list(v.shape) for k, v in feeds.items()}, **options)
    if "avx2" not in host_cpu_flags():
        pytest.skip("host cannot run the x86 build")
    return load_artifact(tmp_path)(feeds), art.meta


@needs_tvm
@pytest.mark.parametrize("batch", [1, 5])
def test_helper_transformer_block_compiles_and_matches_onnx_runtime(batch, tmp_path):
    model = transformer_block()
    feeds = block_feeds(batch, 8)
    (got,), meta = _compile_and_run(model, feeds, tmp_path)
    assert meta["batch"] == batch and meta["inputs"][1]["shape"] == [batch, 8]
    assert _max_rel(_ort(model, feeds)[0], got) < 1e-3


@needs_tvm
def test_compile_cli_takes_shapes_and_names_unbound_dimensions(tmp_path, capsys):
    from graphslim.cli import main

    path = tmp_path / "block.onnx"
    onnx.save(transformer_block(), str(path))
    assert main(["compile", str(path), "--target", "x86", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "input_ids[1] ('sequence')" in err and "--shape" in err and err.count("error") == 1
    assert (
        main(["compile", str(path), "--target", "x86", "--shape", "input_ids=2x8", "-q", "-o", str(tmp_path / "a")])
        == 0
    )
    from graphslim.backend import load_artifact

    meta = load_artifact(tmp_path / "a").meta
    assert meta["batch"] == 2 and [i["shape"] for i in meta["inputs"]] == [[2, 8], [2, 8]]


@needs_tvm
def test_layout_conversion_is_skipped_on_conv_free_graphs():
    """A conv-free module holding a data-dependent shape (a Range whose length is computed at run
    time, as unfolded transformer exports have): TVM's ConvertLayout fails on the match_cast of
    that shape value; graphslim does not call it."""
    import tvm
    from graphslim.kernels.pipeline import NHWC_LAYOUTS, convert_layout
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    b = _Block()
    r = b.op("Cast", b.op("Range", b.const(0, np.int64), "n", b.const(1, np.int64)), to=TensorProto.FLOAT)
    model = b.model(
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])], b.op("Add", r, b.const(1.0)), ["length"]
    )
    mod = from_onnx(model, keep_params_in_input=False)
    assert "match_cast" in mod.script()
    with pytest.raises(tvm.error.InternalError, match="exactly one of the layouts is unknown"):
        relax.transform.ConvertLayout(NHWC_LAYOUTS)(mod)
    assert convert_layout(mod).same_as(mod)


@needs_tvm
def test_variadic_sum_and_max_in_a_conv_net_compile_in_nhwc(tmp_path, caplog):
    """ResNet-50 from the ONNX zoo sums its residuals with Sum; TVM imports Sum/Max as a 5-D stack
    that ConvertLayout rejects ("Invalid SLayout"). Sum becomes an Add chain before import and
    the stack form of what is left (Max) binary ops after it, so the layout conversion runs
    (without them graphslim would fall back to NCHW with a warning)."""
    import tvm
    from graphslim.kernels.pipeline import NHWC_LAYOUTS, unstack_reductions
    from graphslim.kernels.prepare import canonicalize
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    b = _Block()
    conv = [b.op("Conv", "x", b.const(b.rng.standard_normal((8, 4, 3, 3)) * 0.3), pads=[1, 1, 1, 1]) for _ in range(3)]
    s = b.op("Relu", b.op("Sum", *conv))
    out = b.op("Max", s, b.op("Conv", s, b.const(b.rng.standard_normal((8, 8, 1, 1)) * 0.3)))
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])], out, ["N", 8, 6, 6])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}

    mod = from_onnx(canonicalize(fix_shapes(model, {"x": [2, 4, 6, 6]})[0]), keep_params_in_input=False)
    with pytest.raises(tvm.error.InternalError, match="Invalid SLayout"):
        relax.transform.ConvertLayout(NHWC_LAYOUTS)(mod)
    unstacked = unstack_reductions(mod)
    assert "R.stack" not in unstacked.script()
    assert "NHWC" in relax.transform.ConvertLayout(NHWC_LAYOUTS)(unstacked).script()

    with caplog.at_level("WARNING"):
        (got,), meta = _compile_and_run(model, feeds, tmp_path)
    assert not [r for r in caplog.records if "layout conversion" in r.getMessage()]
    assert _max_rel(_ort(model, feeds)[0], got) < 1e-5


@needs_tvm
def test_out_of_range_token_ids_give_nan_not_a_crash(tmp_path):
    feeds = block_feeds(1, 8)
    feeds["input_ids"][0, 2] = VOCAB + 1000
    (got,), _ = _compile_and_run(transformer_block(), feeds, tmp_path)
    assert np.isnan(got).any()


def _linear_3d(w: np.ndarray, bias: np.ndarray, relu: bool = True) -> onnx.ModelProto:
    """x [batch, 6, K] -> Add(bias, MatMul(x, W)) [-> Relu]."""
    b = _Block()
    wname = b.const(w)
    y = b.op("Add", b.const(bias), b.op("MatMul", "x", wname))
    if relu:
        y = b.op("Relu", y)
    k, n = w.shape
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, k])], y, ["batch", 6, n])


@needs_tvm
@pytest.mark.parametrize("batch", [1, 4])
def test_block_sparse_3d_matmul_runs_on_the_bsr_kernel(batch, tmp_path):
    """[B, S, K] x [K, N] at 90% 16x1 block sparsity: the BSR kernel over B*S rows, with the
    bias (added first, as PyTorch exports it) and ReLU fused into it."""
    rng = np.random.default_rng(0)
    k, n = 64, 128
    keep = rng.random((n // 16, k)) >= 0.9
    w = (rng.standard_normal((n, k)) * np.repeat(keep, 16, 0)).astype(np.float32).T
    model = _linear_3d(np.ascontiguousarray(w), rng.standard_normal(n).astype(np.float32))
    feeds = {"x": rng.standard_normal((batch, 6, k)).astype(np.float32)}
    (got,), meta = _compile_and_run(model, feeds, tmp_path)
    assert meta["rewrites"] == ["bsr-dense"]
    assert meta["kernel_schedules"].get("bsr_dense_16x1_relu") == "kernel:bsr_dense", meta["kernel_schedules"]
    assert _max_rel(_ort(model, feeds)[0], got) < 1e-5


@needs_tvm
def test_binary_3d_matmul_runs_on_the_binary_kernel(tmp_path):
    rng = np.random.default_rng(1)
    alpha = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    w = (np.sign(rng.standard_normal((32, 48))) * alpha[:, None]).astype(np.float32).T
    model = _linear_3d(np.ascontiguousarray(w), rng.standard_normal(32).astype(np.float32), relu=False)
    feeds = {"x": rng.standard_normal((2, 6, 48)).astype(np.float32)}
    (got,), meta = _compile_and_run(model, feeds, tmp_path)
    assert meta["rewrites"] == ["binary"] and "kernel:binary_dense" in meta["kernel_schedules"].values()
    assert _max_rel(_ort(model, feeds)[0], got) < 1e-5


def _mlp_3d() -> onnx.ModelProto:
    """Two linear layers on [batch, 6, 64] (ReLU between): 3-D MatMuls with constant weights."""
    b = _Block()
    h = b.op("Relu", b.linear("x", 64, 128))
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 64])],
        b.linear(h, 128, 32),
        ["batch", 6, 32],
    )


@needs_tvm
@pytest.mark.parametrize("batch", [1, 4])
def test_qdq_3d_matmuls_run_on_the_int8_kernel(batch, tmp_path):
    """A QDQ two-layer MLP on [B, S, K] (quantize-int8): both MatMuls on the int8 kernel, the
    requantization fused through the reshape back to 3-D. Compared with ONNX Runtime's QDQ
    reference semantics (graph optimizations off: float math on dequantized values), which the
    exact int32 kernel reproduces to float rounding; ORT's optimized int8 path differs from its
    own reference here (its AVX2 u8s8 kernel sums pairs of products in saturating int16)."""
    from conftest import apply

    from graphslim.core.data import Dataset

    rng = np.random.default_rng(0)
    model = _mlp_3d()
    qmodel, _ = apply(model, "quantize-int8", data=Dataset({"x": rng.standard_normal((32, 6, 64)).astype(np.float32)}))
    feeds = {"x": rng.standard_normal((batch, 6, 64)).astype(np.float32)}
    (got,), meta = _compile_and_run(qmodel, feeds, tmp_path)
    assert meta["rewrites"] == ["int8-dense", "int8-requantize"]
    assert sum(v == "kernel:int8_dense" for v in meta["kernel_schedules"].values()) == 2
    ref = _ort(qmodel, feeds, optimize=False)[0]
    out_scale = next(
        numpy_helper.to_array(i)
        for i in qmodel.graph.initializer
        if i.name == [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"][-1].input[1]
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(out_scale) * 1.01)


@needs_tvm
@pytest.mark.parametrize(
    "options, avx2_kernel",
    [
        ("activations=per_tensor", "avx2"),  # full-range int8 weights: vpmaddwd on int16
        ("activations=per_token", "avx2"),
        ("activations=per_tensor,reduce_range=true", "avx2u8s8"),  # 7-bit weights: vpmaddubsw
    ],
)
def test_dynamic_int8_3d_matmuls_run_on_the_int8_kernel(options, avx2_kernel, tmp_path):
    """``quantize-int8{mode=dynamic}`` on [B, S, K] layers (ONNX MatMulInteger after
    DynamicQuantizeLinear, or the per-token form): every MatMulInteger on graphslim's int8 kernel
    (``int8-integer``), the byte path where the weights are 7-bit, and the outputs equal to ONNX
    Runtime's up to float rounding (the int32 products are exact in both)."""
    from conftest import apply
    from onnx.reference import ReferenceEvaluator

    from graphslim.backend import host_cpu_flags

    rng = np.random.default_rng(0)
    model = _mlp_3d()
    qmodel, _ = apply(model, f"quantize-int8{{mode=dynamic,{options}}}")
    assert [n.op_type for n in qmodel.graph.node].count("MatMulInteger") == 2
    feeds = {"x": rng.standard_normal((3, 6, 64)).astype(np.float32)}
    (got,), meta = _compile_and_run(qmodel, feeds, tmp_path)
    assert "int8-integer" in meta["rewrites"]
    kernels = [k for k, v in meta["kernel_schedules"].items() if v == "kernel:int8_dense"]
    flavor = "vnni" if "avx512_vnni" in host_cpu_flags() else avx2_kernel
    assert len(kernels) == 2 and all(k.startswith(f"int8_dense_{flavor}") for k in kernels), kernels
    # reference: ONNX's own evaluator, whose MatMulInteger is exact (ORT's AVX2 byte kernel sums
    # pairs of full-range products in saturating int16, so ORT differs by up to 4% here)
    ref = ReferenceEvaluator(qmodel).run(None, feeds)[0]
    assert _max_rel(ref, got) < 1e-5
    assert _max_rel(_ort(model, feeds)[0], got) < 0.05  # and it is still the float model, roughly


# ---------------------------------------------------------------- Hugging Face exports (torch)

HF_MODELS = ["bert", "vit", "gpt2", "llama"]


@pytest.fixture(scope="module")
def hf_models() -> dict[str, onnx.ModelProto]:
    pytest.importorskip("torch", exc_type=ImportError)
    pytest.importorskip("transformers", exc_type=ImportError)
    import transformer_models as tm

    return {kind: tm.export_hf(kind) for kind in HF_MODELS}


@pytest.mark.slow
@needs_tvm
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("kind", HF_MODELS)
def test_hugging_face_exports_compile_and_match_onnx_runtime(kind, batch, hf_models, tmp_path):
    import transformer_models as tm

    model = hf_models[kind]
    feeds = tm.sample_inputs_for(model, batch=batch, seq=8)
    (got,), meta = _compile_and_run(model, feeds, tmp_path)
    assert meta["batch"] == batch
    assert "attention" in meta["rewrites"]  # every family's attention on the fused kernel
    # measured 1.9e-7 to 4.2e-7 at batch 1
    assert _max_rel(_ort(model, feeds)[0], got) < 1e-5
