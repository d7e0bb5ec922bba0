"""Shared Relax rewrite: constant-weight contractions -> graphslim kernels.

Every compression-aware kernel that keys on the *values* of a weight (block-sparse, binary)
replaces the same two patterns, after the CPU pipeline's layout conversion and constant folding:

* ``relax.matmul(x, W)`` with ``x`` [M, K] float32 and a constant ``W`` [K, N];
* ``relax.nn.conv2d`` on NHWC data with a constant HWIO weight (groups 1, no dilation); the
  padding becomes a ``relax.op.nn.pad`` in front of the kernel, which reads padded input.

A kernel family supplies one function per pattern that looks at the weight and returns a
:class:`KernelCall` (or None: the layer stays on the dense path) and this module emits the
``call_tir``, then fuses a following constant bias ``add`` and ``relu`` into the kernel (its
``bias`` argument, last before the output, and its ``relu=True`` variant), as TVM's own fusion does
for dense kernels. Kernels take ``(x, *consts, bias, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from graphslim.kernels.pipeline import visit_relax_functions

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


def _static_shape(expr: Any) -> list[int] | None:
    try:
        return [int(d) for d in expr.ty.shape]
    except (AttributeError, TypeError, ValueError):
        return None


def rewrite_contractions(mod: Any, dense: DenseChooser | None, conv: ConvChooser | None) -> tuple[Any, list[str]]:
    """Apply ``dense`` to every float32 ``matmul`` with a constant 2-D weight and ``conv`` to every
    NHWC/HWIO ``conv2d`` with a constant weight; returns the module and the labels of the layers
    replaced (empty: ``mod`` returned unchanged)."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

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
            if call.op == conv2d and conv is not None:
                return self._conv2d(call)
            return call

        def _emit(self, kc: KernelCall, x: Any, out_shape: tuple[int, ...]) -> Any:
            gv = self.builder_.add_func(kc.make(), kc.name)
            kernels[gv.name_hint] = kc.make
            labels.append(kc.label)
            bias = np.zeros(out_shape[-1], np.float32)
            return relax.call_tir(
                gv, [x, *(relax.const(c) for c in kc.consts), relax.const(bias)], relax.TensorType(out_shape, "float32")
            )

        def _matmul(self, call: Any) -> Any:
            if not isinstance(call.args[1], Constant):
                return call
            x = call.args[0]
            xs, ws = _static_shape(x), _static_shape(call.args[1])
            if xs is None or ws is None or len(xs) != 2 or len(ws) != 2 or str(x.ty.dtype) != "float32":
                return call
            w = call.args[1].value.numpy()
            if w.dtype != np.float32:
                return call
            kc = dense(xs[0], np.ascontiguousarray(w.T))  # [N, K]: outputs x inputs
            return call if kc is None else self._emit(kc, x, (xs[0], w.shape[1]))

        def _conv2d(self, call: Any) -> Any:
            a = call.attrs
            if not isinstance(call.args[1], Constant) or str(call.args[0].ty.dtype) != "float32":
                return call
            if (a.data_layout, a.kernel_layout, a.out_layout or a.data_layout) != ("NHWC", "HWIO", "NHWC"):
                return call
            if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation):
                return call
            xs, w = _static_shape(call.args[0]), call.args[1].value.numpy()
            if xs is None or w.dtype != np.float32:
                return call
            kh, kw, _, kout = w.shape
            pt, pl, pb, pr = (int(p) for p in a.padding)
            sh, sw = (int(s) for s in a.strides)
            n, h, wd, c = xs
            hp, wp = h + pt + pb, wd + pl + pr
            shape = ConvShape(n, hp, wp, c, kh, kw, sh, sw, (hp - kh) // sh + 1, (wp - kw) // sw + 1, kout)
            kc = conv(shape, w)
            if kc is None:
                return call
            x = call.args[0]
            if pt or pb or pl or pr:
                x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, pt, pb, pl, pr, 0, 0]))
            return self._emit(kc, x, (n, shape.ho, shape.wo, kout))

    new = visit_relax_functions(Rewriter(mod), mod)
    if not labels:
        return mod, []
    new = _fuse_epilogues(new, kernels)
    return relax.transform.DeadCodeElimination()(new), labels


def _fuse_epilogues(mod: Any, kernels: dict[str, Callable[..., Any]]) -> Any:
    """``add(kernel(...), constant bias)`` and ``relu(kernel(...))`` -> one kernel call that applies
    them to each finished tile (the kernels' bias argument and ReLU variant). The unfused calls are
    left for dead-code elimination."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    add, relu, call_tir = (tvm.ir.Op.get(n) for n in ("relax.add", "relax.nn.relu", "relax.call_tir"))
    with_relu: dict[str, Any] = {}

    @relax.expr_functor.mutator
    class Epilogue(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op not in (add, relu) or not isinstance(call.args[0], relax.Var):
                return call
            inner = self.lookup_binding(call.args[0])
            if not isinstance(inner, relax.Call) or inner.op != call_tir:
                return call
            name = inner.args[0].name_hint
            base = name[: -len("_relu")] if name.endswith("_relu") else name
            if base not in kernels:
                return call
            args = list(inner.args[1].fields)
            out_ty = inner.ty
            if call.op == add:
                if name.endswith("_relu") or not isinstance(call.args[1], Constant):
                    return call
                b = call.args[1].value.numpy()
                k = int(out_ty.shape[-1])
                if b.size != k or b.shape[-1] != k or b.dtype != np.float32 or np.any(args[-1].value.numpy()):
                    return call
                args[-1] = relax.const(b.reshape(k))
                return relax.call_tir(inner.args[0], args, out_ty)
            if name.endswith("_relu"):
                return call
            if base not in with_relu:
                with_relu[base] = self.builder_.add_func(kernels[base](relu=True), f"{base}_relu")
            return relax.call_tir(with_relu[base], args, out_ty)

    return visit_relax_functions(Epilogue(mod), mod)
