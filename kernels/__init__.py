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
* :mod:`graphslim.kernels.rows`: softmax and LayerNorm over the last axis as row kernels.

``REWRITES`` maps a name to ``f(mod, target_spec) -> (mod, changed)``; the backend
(:mod:`graphslim.backend`) applies every rewrite before lowering and lists the ones that changed
something in ``artifact.json``. A rewrite whose ``stage`` attribute is ``"import"`` sees the
module as imported from ONNX (e.g. QDQ weights still int8); the others run on CPU targets after
the layout conversion and constant folding (NHWC convolutions, folded weights). A rewrite must
leave every pattern it does not fully handle as it was: the dense path is always correct.
Importing this package does not import TVM; each rewrite imports it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["REWRITES"]


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


def _row_kernels(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.rows import rewrite_row_ops

    return rewrite_row_ops(mod, spec)


def _packed_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.dense import rewrite_packed_dense

    return rewrite_packed_dense(mod, spec)


_int8_dense.stage = "import"  # type: ignore[attr-defined] - runs before constants fold
_int8_conv.stage = "import"  # type: ignore[attr-defined]
_int8_integer.stage = "import"  # type: ignore[attr-defined]

REWRITES: dict[str, Callable[[Any, dict[str, Any]], tuple[Any, bool]]] = {
    "int8-dense": _int8_dense,
    "int8-conv": _int8_conv,
    "int8-integer": _int8_integer,
    "bsr-dense": _bsr_dense,
    "binary": _binary,
    "int8-requantize": _int8_requantize,
    "row-kernels": _row_kernels,
    "packed-dense": _packed_dense,  # last: the fp32 matmuls no compression-aware kernel took
}
