"""The ONNX model as TVM's importer wants it: static shapes, shape subgraphs folded, no traps.

TVM's ONNX frontend (``tvm.relax.frontend.onnx.from_onnx``) imports what it is given. Exports
from PyTorch (``torch.onnx.export``) compute attention reshapes, masks and position ids at run
time from ``Shape`` nodes (Shape -> Gather -> Unsqueeze -> Concat -> Reshape / Expand / Range).
Imported as they are, those become data-dependent shapes: ``tensor_to_shape`` + ``match_cast``
bindings, ``arange`` with a symbolic length, Expands whose target shape holds a -1 next to
symbolic dimensions. Relax's ``ConvertLayout`` then fails on the MatchCast of a shape value
("Cannot convert when exactly one of the layouts is unknown") and the Expand converter
compares symbolic dimensions with ``==`` ("Cannot use and / or / not operator to Expr").

So before import, in this order:

1. :func:`fix_shapes`: every symbolic input dimension gets a value: from ``shapes``
   (``--shape name=1x128``; a named dimension such as ``sequence`` then has that value in every
   input that uses the name), the leading (batch) dimension from ``batch``; anything left unbound
   is one :class:`~graphslim.core.errors.InputError` naming every such dimension.
2. :func:`split_variadic`: ``Sum`` / ``Mean`` of several inputs -> a chain of ``Add`` (and a
   ``Div``). TVM imports variadic Sum/Mean/Max/Min as ``broadcast_to`` + ``stack`` + a reduction
   over the new axis: a copy of every input, and a rank-5 tensor in a ResNet's residual sum that
   ``ConvertLayout`` cannot map from NCHW to NHWC ("Invalid SLayout: can't find S in source
   layout ABCDE"). Max/Min have no binary ONNX form; :func:`graphslim.kernels.pipeline.unstack_reductions`
   handles them after import.
3. :func:`canonicalize`: graphslim's exact canonicalization passes (fold constants, which with
   static shapes also folds the shape subgraphs; drop identities; fold BatchNorm; fuse
   MatMul+Add; drop dead nodes), repeated until a round changes nothing: folding one shape
   subgraph makes the next tensor's shape static, which the next round folds.

Importing this module does not import TVM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphslim.core.errors import InputError

__all__ = ["canonicalize", "fix_shapes", "parse_shape", "prepare", "split_variadic"]

log = logging.getLogger(__name__)

#: Canonicalization rounds before giving up on a fixed point (transformer exports reach it in 2-3).
MAX_ROUNDS = 10


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``"input_ids=1x128"`` -> ``("input_ids", [1, 128])`` (``,`` also separates dims; a scalar is
    ``name=``)."""
    name, sep, dims = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InputError(f"--shape: expected NAME=DIMS such as input_ids=1x128, got {text!r}")
    parts = [p.strip() for p in dims.replace(",", "x").split("x")] if dims.strip() else []
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--shape {text!r}: dimensions must be integers, e.g. input_ids=1x128") from None
    if any(v < 1 for v in values):
        raise InputError(f"--shape {text!r}: dimensions must be >= 1")
    return name, values


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    return list(vi.type.tensor_type.shape.dim)


def _static(d: onnx.TensorShapeProto.Dimension) -> bool:
    return d.HasField("dim_value") and d.dim_value > 0


class _DimBindings:
    """Values of named symbolic dimensions (``dim_param`` -> value), each with what bound it, so
    that a conflict names both sources."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.sources: dict[str, str] = {}

    def bind(self, param: str, value: int, source: str) -> None:
        if not param:
            return
        if param in self.values and self.values[param] != value:
            raise InputError(
                f"dimension '{param}' is {self.values[param]} by {self.sources[param]} but {value} by {source}"
            )
        self.values[param], self.sources[param] = value, source


def _bind_dims(
    inputs: list[onnx.ValueInfoProto], shapes: dict[str, Sequence[int]], batch: int | None
) -> tuple[dict[str, int], int]:
    """(value of each named symbolic dimension, the batch for leading dimensions left) from
    ``shapes`` (checked against the inputs' static dimensions), then ``batch``, then the
    default batch (see :func:`fix_shapes`)."""
    bound = _DimBindings()
    for vi in inputs:
        if vi.name not in shapes:
            continue
        given, dims = list(shapes[vi.name]), _dims(vi)
        if len(given) != len(dims):
            raise InputError(
                f"--shape {vi.name}: the input has rank {len(dims)}, the shape given has {len(given)} dimensions"
            )
        for i, (d, v) in enumerate(zip(dims, given, strict=True)):
            if _static(d) and d.dim_value != v:
                raise InputError(f"--shape {vi.name}: dimension {i} is {d.dim_value} in the model, not {v}")
            if not _static(d):
                bound.bind(d.dim_param, v, f"--shape {vi.name}")
    if batch is not None:
        for vi in inputs:
            dims = _dims(vi)
            if dims and not _static(dims[0]):
                if vi.name in shapes and shapes[vi.name][0] != batch:
                    raise InputError(
                        f"--batch {batch} conflicts with --shape {vi.name} (leading dimension {shapes[vi.name][0]})"
                    )
                bound.bind(dims[0].dim_param, batch, f"--batch {batch}")
    default_batch = batch
    if default_batch is None:
        given_lead = [
            shapes[vi.name][0] for vi in inputs if vi.name in shapes and _dims(vi) and not _static(_dims(vi)[0])
        ]
        default_batch = given_lead[0] if given_lead else 1
    for vi in inputs:  # named leading dimensions not given: the batch, wherever else they appear
        dims = _dims(vi)
        if dims and not _static(dims[0]) and vi.name not in shapes and dims[0].dim_param not in bound.values:
            bound.bind(dims[0].dim_param, default_batch, "the batch size")
    return bound.values, default_batch


def _set_dims(
    m: onnx.ModelProto, shapes: dict[str, Sequence[int]], bound: dict[str, int], default_batch: int
) -> list[str]:
    """Give ``m``'s symbolic input dimensions their values (in place); returns the ones that have
    none (``input[i] ('name')``)."""
    unbound: list[str] = []
    for vi in _graph_inputs(m):
        given = shapes.get(vi.name)
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if _static(d):
                continue
            if given is not None:
                value = given[i]
            elif d.dim_param in bound:
                value = bound[d.dim_param]
            elif i == 0:
                value = default_batch
            else:
                unbound.append(f"{vi.name}[{i}]" + (f" ('{d.dim_param}')" if d.dim_param else ""))
                continue
            d.Clear()
            d.dim_value = value
    return unbound


def _unbound_error(inputs: list[onnx.ValueInfoProto], unbound: list[str], default_batch: int) -> InputError:
    """The error naming every dimension left without a value, with a ``--shape`` to give."""
    first = next(vi for vi in inputs if any(u.startswith(f"{vi.name}[") for u in unbound))
    example = "x".join(
        str(d.dim_value) if _static(d) else str(default_batch) if i == 0 else f"<{d.dim_param or '?'}>"
        for i, d in enumerate(_dims(first))
    )
    return InputError(
        f"symbolic input dimensions without a value: {', '.join(unbound)}; compiling needs static "
        f"shapes: give them with --shape NAME=DIMS (here --shape {first.name}={example} with numbers "
        "for the <...>); a named dimension given once applies to every input that uses the name"
    )


def fix_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None, batch: int | None = None
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose inputs have static shapes, and the batch size it was fixed to.

    ``shapes`` gives whole input shapes (static dimensions must match). A symbolic dimension
    named in one input (``dim_param``, e.g. ``batch``, ``sequence``) takes the same value in every
    input. Leading dimensions left symbolic take ``batch`` (default: the leading dimension
    ``shapes`` gave, else 1). Any other symbolic dimension left is an error that names them all.
    The batch returned is ``batch`` when given, else the first input's leading dimension."""
    shapes = dict(shapes or {})
    inputs = _graph_inputs(model)
    names = [vi.name for vi in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise InputError(f"--shape names no model input: {', '.join(unknown)} (inputs: {', '.join(names)})")
    if batch is not None and batch < 1:
        raise InputError("--batch must be >= 1")
    bound, default_batch = _bind_dims(inputs, shapes, batch)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    unbound = _set_dims(m, shapes, bound, default_batch)
    if unbound:
        raise _unbound_error(inputs, unbound, default_batch)
    for vi in _graph_inputs(m):
        if not vi.type.tensor_type.HasField("shape"):
            raise InputError(f"input '{vi.name}' declares no shape: give it with --shape {vi.name}=DIMS")
    # Stale intermediate shapes (symbolic) would stop the folder: canonicalize infers them again.
    # Outputs keep their shapes (the importer's checker wants one), with the bound names filled in.
    del m.graph.value_info[:]
    for o in m.graph.output:
        for d in o.type.tensor_type.shape.dim:
            if not _static(d):
                param = d.dim_param
                d.Clear()
                if param in bound:
                    d.dim_value = bound[param]
    first = next((vi for vi in _graph_inputs(m) if vi.type.tensor_type.shape.dim), None)
    resolved = batch if batch is not None else (first.type.tensor_type.shape.dim[0].dim_value if first else 1)
    return m, resolved


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def split_variadic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Sum(a, b, c, ...)`` -> ``Add(Add(a, b), c)...``, ``Mean`` likewise then divided by the count,
    a one-input Sum/Mean -> ``Identity`` (main graph; returns the model and how many nodes were
    split). Add broadcasts as Sum does, so the result is the same up to float summation order
    (left to right, as ONNX Runtime sums)."""
    todo = [n for n in model.graph.node if n.op_type in ("Sum", "Mean") and n.domain in ("", "ai.onnx")]
    if not todo:
        return model, 0
    types = _elem_types(model) if any(n.op_type == "Mean" and len(n.input) > 1 for n in todo) else {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.op_type not in ("Sum", "Mean") or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        ins = list(node.input)
        if len(ins) == 1:
            nodes.append(helper.make_node("Identity", ins, list(node.output), name=base))
            continue
        mean = node.op_type == "Mean"
        acc = ins[0]
        for i, x in enumerate(ins[1:], 1):
            last = i == len(ins) - 1 and not mean
            out = node.output[0] if last else f"{base}/add_{i}"
            nodes.append(helper.make_node("Add", [acc, x], [out], name=f"{base}/add_{i}"))
            acc = out
        if mean:
            elem = types.get(node.input[0], onnx.TensorProto.FLOAT)
            count = numpy_helper.from_array(
                np.asarray(len(ins), dtype=helper.tensor_dtype_to_np_dtype(elem)), f"{base}/count"
            )
            m.graph.initializer.append(count)
            nodes.append(helper.make_node("Div", [acc, count.name], [node.output[0]], name=f"{base}/div"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, len(todo)


def canonicalize(model: onnx.ModelProto, max_rounds: int = MAX_ROUNDS) -> onnx.ModelProto:
    """graphslim's exact canonicalization passes (``graphslim.passes.DEFAULT_PIPELINE``), repeated
    until a round changes nothing (at most ``max_rounds``)."""
    from graphslim.passes import DEFAULT_PIPELINE

    from graphslim.core.ir import Graph
    from graphslim.pipeline import PassContext, PassManager

    graph = Graph.from_model(model)
    graph.infer_shapes()
    for i in range(max_rounds):
        records = PassManager(DEFAULT_PIPELINE).run(graph, PassContext())
        changed = [r.text for r in records if r.changed]
        log.debug(
            "canonicalization round %d: %s (%d nodes)", i + 1, ", ".join(changed) or "no change", len(graph.nodes)
        )
        if not changed:
            break
    else:
        log.warning("canonicalization still changed the model after %d rounds; importing it as it is", max_rounds)
    return graph.to_model()


def prepare(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None, batch: int | None = None
) -> tuple[onnx.ModelProto, int]:
    """:func:`fix_shapes`, then :func:`split_variadic`, then :func:`canonicalize` to a fixed point:
    the model to hand to TVM's importer, and its batch size."""
    static, resolved = fix_shapes(model, shapes, batch)
    static, split = split_variadic(static)
    if split:
        log.info("split %d variadic Sum/Mean node(s) into Add chains", split)
    return canonicalize(static), resolved
