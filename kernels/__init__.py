"""TVM kernels, schedules and the Relax rewrites that use them, installed as ``graphslim.kernels``.

* :mod:`graphslim.kernels.schedules`: default CPU schedules for the dense hot ops (dlight rules);
* :mod:`graphslim.kernels.pipeline`: the Relax pipeline for CPU targets that applies them;
* :mod:`graphslim.kernels.tuning`: MetaSchedule tuning with a reusable database;
* :mod:`graphslim.kernels.sparse`: the block-sparse (BSR) dense and conv kernels and their rewrite;
* :mod:`graphslim.kernels.int8`: the int8 dense and conv kernels for QDQ layers (VNNI, AVX2, AArch64
  dot product) and the requantization epilogue;
* :mod:`graphslim.kernels.binary`: dense and conv kernels on 1-bit packed weights (binary layers);
* :mod:`graphslim.kernels.rewrite`: the shared rewrite of constant-weight matmul/conv2d to a kernel;
* :mod:`graphslim.kernels.dense`: fp32 matmuls with constant weights on packed weight panels;
* :mod:`graphslim.kernels.rows`: softmax and LayerNorm over the last axis as row kernels;
* :mod:`graphslim.kernels.attention`: attention (``softmax(Q K^T * scale + mask) V``) as one kernel;
* :mod:`graphslim.kernels.params`: the weights lifted out of the library into ``params.bin``.

The hand-written kernels keep their register tiles and per-row partials in small ``global``-scope
buffers declared inside their parallel loops: TVM lowers a constant-size ``global`` allocation
under 1 KB to a stack slot, which LLVM keeps in registers, but a ``local`` one to a
``TVMBackendAllocWorkspace`` call per iteration of the parallel loop whose partials stay in
memory (measured, same process, one thread: softmax 512 x 128 134 -> 74 us; BSR 1x4 at batch 32
1.21x, other BSR and int8 shapes 1.01-1.06x).

A rewrite is ``f(mod, target_spec) -> (mod, changed)``. :data:`IMPORT_REWRITES` and
:data:`FOLDED_REWRITES` list them, as (name, rewrite) pairs in the order they run, by stage: the
first see the module as imported from ONNX (e.g. QDQ weights still int8), the others run on CPU
targets after the layout conversion and constant folding (NHWC convolutions, folded weights).
``REWRITES`` maps each name to its rewrite in that same order (import stage first); the backend
(:mod:`graphslim.backend`) applies every rewrite before lowering and lists the ones that changed
something in ``artifact.json``. A rewrite must leave every pattern it does not fully handle as it
was: the dense path is always correct. Importing this package does not import TVM; each
rewrite imports it when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["FOLDED_REWRITES", "IMPORT_REWRITES", "REWRITES", "Rewrite", "import_stage"]

#: ``f(mod, target_spec) -> (mod, changed)``.
Rewrite = Callable[[Any, dict[str, Any]], tuple[Any, bool]]


def _bsr_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.sparse import rewrite_bsr_dense

    return rewrite_bsr_dense(mod, spec)


def _int8_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.int8 import rewrite_int8_dense

    return rewrite_int8_dense(mod, spec)


def _binary(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.binary import rewrite_binary

    return rewrite_binary(mod, spec)


def _int8_requantize(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.int8 import fuse_requantization

    return fuse_requantization(mod, spec)


def _int8_integer(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.int8 import rewrite_int8_integer

    return rewrite_int8_integer(mod, spec)


def _int8_conv(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.int8 import rewrite_int8_conv

    return rewrite_int8_conv(mod, spec)


def _attention(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.attention import rewrite_attention

    return rewrite_attention(mod, spec)


def _row_kernels(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.rows import rewrite_row_ops

    return rewrite_row_ops(mod, spec)


def _packed_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.dense import rewrite_packed_dense

    return rewrite_packed_dense(mod, spec)


#: The rewrites that see the module as imported, before the CPU pipeline converts layouts and
#: folds constants, in the order they run. They need the QDQ weights as int8 constants behind
#: ``dequantize``, which constant folding would turn into float32 weights. Their patterns are
#: disjoint (float ``matmul`` / ``conv2d`` of dequantized operands, int32 ``matmul``), so their
#: order among themselves does not change what they match.
IMPORT_REWRITES: tuple[tuple[str, Rewrite], ...] = (
    ("int8-dense", _int8_dense),
    # NCHW as imported: it adds transposes to and from NHWC around its kernel, which the layout
    # step that follows moves down and cancels between layers
    ("int8-conv", _int8_conv),
    ("int8-integer", _int8_integer),  # MatMulInteger (dynamic quantization)
)

#: The rewrites that run after layout conversion and constant folding (CPU targets), in order.
FOLDED_REWRITES: tuple[tuple[str, Rewrite], ...] = (
    # the two compression-aware rewrites that key on the values of a folded float32 weight; they
    # take disjoint weights except a binary weight with enough all-zero rows to be block-sparse,
    # which the BSR kernel, first, takes
    ("bsr-dense", _bsr_dense),
    ("binary", _binary),
    # extends the import stage's int8 kernels with the ops that follow them; after constant
    # folding, because the bias it moves into a kernel is a constant only then (QDQ models
    # dequantize it from int32)
    ("int8-requantize", _int8_requantize),
    # before the row kernels: it takes the softmax between attention's two matmuls with them
    ("attention", _attention),
    ("row-kernels", _row_kernels),  # softmax, LayerNorm, reductions: no other rewrite takes them
    # last: the fp32 matmuls with constant weights that no compression-aware kernel took
    ("packed-dense", _packed_dense),
)

#: Every rewrite by name, in the order the backend applies them (import stage first). Read-only:
#: the order lives in :data:`IMPORT_REWRITES` and :data:`FOLDED_REWRITES`.
REWRITES: Mapping[str, Rewrite] = MappingProxyType(dict(IMPORT_REWRITES + FOLDED_REWRITES))


def import_stage(name: str) -> bool:
    """Whether the rewrite called ``name`` runs on the module as imported (:data:`IMPORT_REWRITES`)."""
    return any(name == n for n, _ in IMPORT_REWRITES)
