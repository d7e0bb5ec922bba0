"""Weights outside the library: lift a compiled module's large constants into parameters of
``main``, and write / read them as one file of aligned raw tensors.

A Relax executable embeds its constants in the library. Loading such a library costs the weights
about four times over at the peak (the mapped file, the blob TVM reads from it, a copy while it
deserializes, the tensors) and twice for good (the mapping stays resident beside the tensors):
a 4.3M-parameter encoder added 57 MB to the process where ONNX Runtime adds 22 MB. With the
weights lifted, ``main`` takes them after the model's inputs, the library holds code only, and the
runner reads ``params.bin`` once into one aligned buffer whose slices TVM uses without a copy.

The file format (``params.bin``): the tensors' raw little-endian bytes, each starting at a
multiple of :data:`ALIGN` bytes, in the order ``main`` takes them; artifact.json records each
tensor's dtype, shape and offset, the total size and the file's sha256 (see
``graphslim.backend.driver``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ALIGN", "LIFTED_DTYPES", "MIN_BYTES", "aligned_buffer", "lift_constants", "pack", "views"]

#: Each tensor starts at a multiple of this many bytes (TVM's allocation alignment).
ALIGN = 64
#: Constants smaller than this stay in the library (scalars, shapes, small biases).
MIN_BYTES = 4096
#: dtypes lifted: those numpy and DLPack exchange without surprises.
LIFTED_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64")


def lift_constants(mod: Any, function: str = "main", min_bytes: int = MIN_BYTES) -> tuple[Any, list[np.ndarray]]:
    """``mod`` with every constant of ``function`` of at least ``min_bytes`` (and a dtype of
    :data:`LIFTED_DTYPES`) turned into a new parameter of it, appended after its own parameters;
    returns the module and the constants' values (numpy) in parameter order. A constant used
    several times becomes one parameter."""
    from tvm import relax

    gvs = [gv for gv in mod.get_global_vars() if gv.name_hint == function]
    func = mod[gvs[0]] if gvs else None
    if not isinstance(func, relax.Function):
        return mod, []
    values: list[np.ndarray] = []
    lifted: list[Any] = []

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__(mod)
            self.seen: dict[Any, Any] = {}

        def visit_generic_const_(self, op: Any) -> Any:
            data = op.value
            if not hasattr(data, "numpy"):  # a scalar immediate, not a tensor
                return op
            dtype = str(data.dtype)
            if dtype not in LIFTED_DTYPES or not data.shape:
                return op
            if int(np.prod(data.shape)) * np.dtype(dtype).itemsize < min_bytes:
                return op
            if op in self.seen:
                return self.seen[op]
            var = relax.Var(f"param_{len(lifted)}", op.ty)
            self.seen[op] = var
            lifted.append(var)
            values.append(data.numpy())
            return var

    lift = _Lift()
    visited = lift.visit_expr(func)
    if not lifted:
        return mod, []
    new = relax.Function(
        list(visited.params) + lifted,
        visited.body,
        ret_ty=func.ret_ty,
        is_pure=func.is_pure,
        attrs=func.attrs,
        span=func.span,
    )
    lift.builder_.update_func(gvs[0], new)
    return lift.builder_.get(), values


def pack(values: list[np.ndarray]) -> tuple[bytes, list[dict[str, Any]]]:
    """The bytes of ``params.bin`` for ``values`` and each tensor's entry (dtype, shape, offset)."""
    chunks: list[bytes] = []
    entries: list[dict[str, Any]] = []
    size = 0
    for v in values:
        v = np.ascontiguousarray(v)
        pad = -size % ALIGN
        chunks.append(b"\0" * pad)
        size += pad
        entries.append({"dtype": str(v.dtype), "shape": [int(d) for d in v.shape], "offset": size})
        data = v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes()
        chunks.append(data)
        size += len(data)
    return b"".join(chunks), entries


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose data starts at a multiple of :data:`ALIGN`."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


def views(buffer: np.ndarray, entries: list[dict[str, Any]]) -> list[np.ndarray]:
    """The tensors of ``params.bin`` (read into ``buffer``) as views of it, no copy."""
    out = []
    for e in entries:
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        n = int(np.prod(e["shape"], dtype=np.int64)) * dtype.itemsize
        out.append(buffer[e["offset"] : e["offset"] + n].view(dtype).reshape(e["shape"]))
    return out
