"""Shared Relax rewrite: constant-weight contractions -> graphslim kernels.

Every compression-aware kernel that keys on the *values* of a weight (block-sparse, binary)
replaces the same two patterns, after the CPU pipeline's layout conversion and constant folding:

* ``relax.matmul(x, W)`` with ``x`` [..., K] float32 (static shape) and a constant ``W`` [K, N]:
  a 2-D product over the ``M`` = prod(...) flattened rows. A transformer's linear layers are 3-D
  MatMuls ([B, S, K] x [K, N]); they become ``reshape`` to [M, K] -> kernel -> ``reshape`` back,
  and the reshapes lower to views (``RewriteDataflowReshape``) or fuse into their neighbours;
* ``relax.nn.conv2d`` on NHWC data with a constant HWIO weight (groups 1, no dilation); the
  padding becomes a ``relax.op.nn.pad`` in front of the kernel, which reads padded input.

A kernel family supplies one function per pattern that looks at the weight and returns a
:class:`KernelCall` (or None: the layer stays on the dense path) and this module emits the
``call_tir``, then fuses a following constant bias ``add`` (either operand order: PyTorch exports
write ``Add(bias, MatMul)``) and ``relu`` into the kernel (its ``bias`` argument, last before the
output, and its ``relu=True`` variant), also through the ``reshape`` back of an N-D layer, as
TVM's own fusion does for dense kernels. Kernels take ``(x, *consts, bias, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from graphslim.kernels.pipeline import static_shape, visit_relax_functions

__all__ = ["ConvShape", "KernelCall", "rewrite_contractions"]


@dataclass(frozen=True)
class ConvShape:
    """A NHWC convolution as the kernels see it: input already padded."""

    n: int
    hp: int
    wp: int
    c: int
    kh: int
    kw: int
    sh: int
    sw: int
    ho: int
    wo: int
    k: int  # output channels


@dataclass
class KernelCall:
    """One replacement: ``make(relu=...)`` builds the PrimFunc ``(x, *consts, bias, y)``."""

    name: str
    make: Callable[..., Any]
    consts: list[np.ndarray]
    label: str  # what the rewrite reports for this layer (e.g. the block size)


DenseChooser = Callable[[int, np.ndarray], "KernelCall | None"]  # (rows M, W [N, K]) -> call
ConvChooser = Callable[[ConvShape, np.ndarray], "KernelCall | None"]  # (shape, W HWIO) -> call


def _dense_operands(call: Any) -> tuple[list[int], np.ndarray] | None:
    """Pattern: (x's static shape [..., K], the constant float32 weight [K, N]) of a ``matmul``
    ``call`` with float32 ``x`` of rank >= 2, else None."""
    from tvm.ir.expr import Constant

    if not isinstance(call.args[1], Constant):
        return None
    x = call.args[0]
    xs, ws = static_shape(x), static_shape(call.args[1])
    if xs is None or ws is None or len(xs) < 2 or len(ws) != 2 or str(x.ty.dtype) != "float32":
        return None
    w = call.args[1].value.numpy()
    if w.dtype != np.float32 or xs[-1] != w.shape[0]:
        return None
    return xs, w


def _conv_operands(call: Any) -> tuple[ConvShape, np.ndarray, tuple[int, ...]] | None:
    """Pattern: (its shape, the constant float32 HWIO weight, the padding (top, left, bottom,
    right)) of an NHWC ``conv2d`` ``call`` with groups 1 and no dilation, else None."""
    from tvm.ir.expr import Constant

    a = call.attrs
    if not isinstance(call.args[1], Constant) or str(call.args[0].ty.dtype) != "float32":
        return None
    if (a.data_layout, a.kernel_layout, a.out_layout or a.data_layout) != ("NHWC", "HWIO", "NHWC"):
        return None
    if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation):
        return None
    xs, w = static_shape(call.args[0]), call.args[1].value.numpy()
    if xs is None or w.dtype != np.float32:
        return None
    kh, kw, _, kout = w.shape
    pt, pl, pb, pr = (int(p) for p in a.padding)
    sh, sw = (int(s) for s in a.strides)
    n, h, wd, c = xs
    hp, wp = h + pt + pb, wd + pl + pr
    shape = ConvShape(n, hp, wp, c, kh, kw, sh, sw, (hp - kh) // sh + 1, (wp - kw) // sw + 1, kout)
    return shape, w, (pt, pl, pb, pr)


def rewrite_contractions(mod: Any, dense: DenseChooser | None, conv: ConvChooser | None) -> tuple[Any, list[str]]:
    """Apply ``dense`` to every float32 ``matmul`` with a constant 2-D weight and ``conv`` to every
    NHWC/HWIO ``conv2d`` with a constant weight; returns the module and the labels of the layers
    replaced (empty: ``mod`` returned unchanged)."""
    import tvm
    from tvm import relax

    mod = relax.transform.FoldConstant()(mod)  # permute_dims(W) of a Gemm folds into W^T
    matmul = tvm.ir.Op.get("relax.matmul")
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    labels: list[str] = []
    kernels: dict[str, Callable[..., Any]] = {}  # kernel name -> its factory (for the epilogue pass)

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op == matmul and dense is not None:
                return self._matmul(call)
            return self._conv2d(call) if call.op == conv2d and conv is not None else call

        def _emit(self, kc: KernelCall, x: Any, out_shape: tuple[int, ...]) -> Any:
            gv = self.builder_.add_func(kc.make(), kc.name)
            kernels[gv.name_hint] = kc.make
            labels.append(kc.label)
            bias = np.zeros(out_shape[-1], np.float32)
            return relax.call_tir(
                gv, [x, *(relax.const(c) for c in kc.consts), relax.const(bias)], relax.TensorType(out_shape, "float32")
            )

        def _matmul(self, call: Any) -> Any:
            found = _dense_operands(call)
            if found is None:
                return call
            xs, w = found
            x, m = call.args[0], int(np.prod(xs[:-1]))
            kc = dense(m, np.ascontiguousarray(w.T))  # [N, K]: outputs x inputs
            if kc is None:
                return call
            if len(xs) == 2:
                return self._emit(kc, x, (m, w.shape[1]))
            # an N-D layer: a 2-D product over its flattened rows, reshaped back
            rows = self.builder_.emit(relax.op.reshape(x, (m, xs[-1])))
            out = self.builder_.emit(self._emit(kc, rows, (m, w.shape[1])))
            return relax.op.reshape(out, (*xs[:-1], w.shape[1]))

        def _conv2d(self, call: Any) -> Any:
            found = _conv_operands(call)
            if found is None:
                return call
            shape, w, (pt, pl, pb, pr) = found
            kc = conv(shape, w)
            if kc is None:
                return call
            x = call.args[0]
            if pt or pb or pl or pr:  # the kernels read padded input
                x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, pt, pb, pl, pr, 0, 0]))
            return self._emit(kc, x, (shape.n, shape.ho, shape.wo, shape.k))

    new = visit_relax_functions(Rewriter(mod), mod)
    if not labels:
        return mod, []
    new = _fuse_epilogues(new, kernels)
    return relax.transform.DeadCodeElimination()(new), labels


def _base_name(kernel: str) -> str:
    """A kernel's name without the ``_relu`` of its ReLU variant."""
    return kernel[: -len("_relu")] if kernel.endswith("_relu") else kernel


def _epilogue_bias(bias_arg: Any, kernel_args: list[Any], k: int, out_rank: int) -> np.ndarray | None:
    """Check: the float32 constant bias [k] that an ``add`` of ``bias_arg`` brings into a kernel
    whose bias argument (last of ``kernel_args``) is still zero, and that does not broadcast the
    result (rank ``out_rank``) to a higher rank; else None."""
    from tvm.ir.expr import Constant

    if not isinstance(bias_arg, Constant):
        return None
    b = bias_arg.value.numpy()
    if b.size != k or b.shape[-1] != k or b.dtype != np.float32 or np.any(kernel_args[-1].value.numpy()):
        return None
    if b.ndim > out_rank:
        return None
    return b.reshape(k)


def _fuse_epilogues(mod: Any, kernels: dict[str, Callable[..., Any]]) -> Any:
    """``add(kernel(...), constant bias)`` (either operand order) and ``relu(kernel(...))`` -> one
    kernel call that applies them to each finished tile (the kernels' bias argument and ReLU
    variant), also where a ``reshape`` that keeps the last (output) axis sits between the kernel
    and the op (N-D layers): the reshape then moves after the fused kernel. The unfused calls are
    left for dead-code elimination."""
    import tvm
    from tvm import relax

    add, relu, call_tir, reshape = (
        tvm.ir.Op.get(n) for n in ("relax.add", "relax.nn.relu", "relax.call_tir", "relax.reshape")
    )
    with_relu: dict[str, Any] = {}

    @relax.expr_functor.mutator
    class Epilogue(relax.PyExprMutator):
        def kernel_call(self, expr: Any) -> tuple[Any, Any] | None:
            """Pattern: (the kernel's call_tir, the reshape after it or None) behind ``expr``."""
            if not isinstance(expr, relax.Var):
                return None
            inner = self.lookup_binding(expr)
            after = None
            if isinstance(inner, relax.Call) and inner.op == reshape and isinstance(inner.args[0], relax.Var):
                after = inner
                inner = self.lookup_binding(inner.args[0])
                shapes = [static_shape(after), static_shape(after.args[0])]
                if None in shapes or shapes[0][-1] != shapes[1][-1]:
                    return None
            if not isinstance(inner, relax.Call) or inner.op != call_tir:
                return None
            return (inner, after) if _base_name(inner.args[0].name_hint) in kernels else None

        def fused(self, call: Any, inner: Any, after: Any, bias_arg: Any) -> Any:
            """Rewrite: ``inner`` (the kernel call) with ``call`` (the add or relu) fused, or None."""
            name = inner.args[0].name_hint
            args = list(inner.args[1].fields)
            if name.endswith("_relu"):
                return None  # a ReLU variant is the end of the epilogue
            if call.op == add:
                rank = len((after if after is not None else inner).ty.shape)
                bias = _epilogue_bias(bias_arg, args, int(inner.ty.shape[-1]), rank)
                if bias is None:
                    return None
                args[-1] = relax.const(bias)
                return relax.call_tir(inner.args[0], args, inner.ty)
            if name not in with_relu:
                with_relu[name] = self.builder_.add_func(kernels[name](relu=True), f"{name}_relu")
            return relax.call_tir(with_relu[name], args, inner.ty)

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op not in (add, relu):
                return call
            found, bias_arg = self.kernel_call(call.args[0]), call.args[1] if call.op == add else None
            if found is None and call.op == add:
                found, bias_arg = self.kernel_call(call.args[1]), call.args[0]
            if found is None:
                return call
            inner, after = found
            fused = self.fused(call, inner, after, bias_arg)
            if fused is None:
                return call
            return fused if after is None else relax.op.reshape(self.builder_.emit(fused), after.args[1])

    return visit_relax_functions(Epilogue(mod), mod)
