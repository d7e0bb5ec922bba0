"""The ONNX IR layer: checked loading, atomic saving, and a graph facade with use-def links.

Every pass works on :class:`Graph`, a thin facade over onnx-graphsurgeon (a well-kept NVIDIA library
whose producer/consumer links stay in sync as the graph is edited). graphsurgeon's names mislead
(``Tensor.inputs`` are the producers, ``Tensor.outputs`` the consumers), so passes never touch them:
they call :meth:`Graph.producer`, :meth:`Graph.consumers`, :meth:`Graph.constant`,
:meth:`Graph.replace_all_uses` and friends, and no pass keeps its own name-to-node dictionaries.

Invariants the facade keeps:
- constant values are immutable: changing a weight means :meth:`Graph.set_constant`, which makes a
  new tensor when the old one is shared by another node;
- node and tensor names stay unique (:meth:`Graph.fresh_name` is deterministic: same graph, same
  names), so saved models are byte-identical across runs;
- a graph output tensor keeps its name and shape: rewrites reroute producers to it, never rename it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper

from graphslim.core.errors import InputError
from graphslim.core.fs import atomic_write

__all__ = [
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "NORMALIZED_OPSET",
    "Constant",
    "Graph",
    "Node",
    "Tensor",
    "Variable",
    "eval_dim",
    "external_data_files",
    "is_large",
    "model_size",
    "load_model",
    "model_bytes",
    "model_file_sha256",
    "strip_large_initializers",
    "save_model",
]

log = logging.getLogger(__name__)

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable

MIN_OPSET = 9
MAX_OPSET = 21
# Older opsets are converted to this one on load, so passes see one form of Split, Squeeze,
# Reduce*, Slice and friends (inputs, not attributes). onnxruntime-training 1.19 loads it too.
NORMALIZED_OPSET = 13
# onnxruntime-training 1.19 rejects IR versions above 10 (see ../shared/NOTES-ENV.md).
MAX_IR_VERSION = 10
_TWO_GB = 2**31 - 1
_CHEAP_CHECK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- loading and saving


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape the model's folder (path traversal)."""
    base = base_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location):
            raise InputError(f"tensor '{tensor.name}': external data location '{location}' is not a relative path")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"tensor '{tensor.name}': external data '{location}' points outside the model's folder")
        if not target.is_file():
            raise InputError(f"tensor '{tensor.name}': external data file '{location}' is missing")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info.get("length", "0") or 0)
        except ValueError:
            raise InputError(f"tensor '{tensor.name}': external data offset or length is not an integer") from None
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset > size or offset + length > size:
            raise InputError(
                f"tensor '{tensor.name}': external data range (offset {offset}, length {length}) runs past the "
                f"end of '{location}' ({size} bytes)"
            )
        needed = _tensor_nbytes(tensor)
        held = length if "length" in info else size - offset
        if needed is not None and held < needed:
            raise InputError(
                f"tensor '{tensor.name}': shape {list(tensor.dims)} needs {needed} bytes; its external data in "
                f"'{location}' holds {held} from offset {offset}"
            )


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's data from its dims and type (None for strings and sub-byte types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or not itemsize:
        return None
    n = 1
    for d in tensor.dims:
        n *= d
    return n * itemsize


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files a model names (sorted, unique), without loading them."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - callers have validated the model already
        return []
    names = set()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return [p.parent / n for n in sorted(names)]


def model_file_sha256(path: Path) -> str:
    """sha256 of the model file and, in order, the external data files it names (streamed)."""
    h = hashlib.sha256()
    for p in [path, *external_data_files(path)]:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_model(path: str | os.PathLike[str], *, normalize_opset: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, check it, infer shapes. Raise :class:`InputError` with one clear line.

    Accepts default-domain opsets 9 to 21; with ``normalize_opset`` older ones are converted to
    opset 13. External data is read only from inside the model's folder.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, TypeError, RuntimeError, OSError) as e:  # protobuf raises several
        raise InputError(f"{p}: not a valid ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - protobuf's C parser raises odd types on garbage
        raise InputError(f"{p}: not a valid ONNX model ({type(e).__name__})") from None
    try:
        _touch_strings(model)
    except UnicodeError:
        raise InputError(f"{p}: not a valid ONNX model (a name or string is not valid UTF-8)") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{p}: not a valid ONNX model (no graph or no nodes)")
    if len(model.graph.output) == 0:
        raise InputError(f"{p}: the graph has no outputs")
    _check_external_data(model, p.parent)
    try:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read external data ({_first_line(e)})") from None

    _check_initializers(model, str(p))
    opset = _default_opset(model)
    if opset is None:
        raise InputError(f"{p}: the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"{p}: unsupported opset {opset} (graphslim supports opsets {MIN_OPSET} to {MAX_OPSET})")
    if model.ir_version < 3:
        raise InputError(f"{p}: unsupported IR version {model.ir_version}")
    model = check_and_infer(model, what=str(p))
    if normalize_opset and opset < NORMALIZED_OPSET:
        model = _convert_opset(model, NORMALIZED_OPSET, what=str(p))
    return model


def _touch_strings(msg: Any) -> None:
    """Decode every string field once: protobuf decodes lazily, so invalid UTF-8 in a name would
    otherwise surface as a UnicodeDecodeError deep inside a pass."""
    if isinstance(msg, onnx.TensorProto):
        # Only its names: listing all fields would copy the weights out of raw_data.
        for v in [msg.name, *(e.key for e in msg.external_data), *(e.value for e in msg.external_data)]:
            if not isinstance(v, str):
                raise UnicodeError("not UTF-8")
            v.encode("utf-8")
        return
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            for v in [value] if isinstance(value, str | bytes) else value:
                if not isinstance(v, str):  # protobuf hands back invalid UTF-8 as bytes
                    raise UnicodeError("not UTF-8")
                v.encode("utf-8")  # lone surrogates from a lenient decode fail here
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(value, Message):
                _touch_strings(value)
            else:  # a repeated field
                for item in value:
                    _touch_strings(item)


def _check_initializers(model: onnx.ModelProto, what: str) -> None:
    """Every initializer holds as many values as its dims declare (the checker does not ensure it)."""
    for t in model.graph.initializer:
        if any(d < 0 for d in t.dims):
            raise InputError(f"{what}: initializer '{t.name}' has a negative dimension {list(t.dims)}")
        n = 1
        for d in t.dims:
            n *= d
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against the file by _check_external_data, and by onnx when read
        if t.data_type in (onnx.TensorProto.UNDEFINED,) or t.data_type not in onnx.helper.get_all_tensor_dtypes():
            raise InputError(f"{what}: initializer '{t.name}' has an unknown data type {t.data_type}")
        if t.data_type == onnx.TensorProto.STRING:
            held = len(t.string_data)
        elif t.HasField("raw_data"):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except (KeyError, TypeError, ValueError):
                continue  # sub-byte and exotic types: leave them to onnx
            if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or not itemsize:
                continue
            if n * itemsize > _CHEAP_CHECK_BYTES:
                continue  # measuring big raw data copies it; Graph.constant catches a mismatch when read
            held = len(t.raw_data) // itemsize
        else:
            field = onnx.helper.tensor_dtype_to_field(t.data_type)
            held = len(getattr(t, field))
            if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                held //= 2
        if held != n:
            raise InputError(
                f"{what}: initializer '{t.name}' declares shape {list(t.dims)} ({n} values) but holds {held}"
            )


def check_and_infer(model: onnx.ModelProto, *, what: str = "model") -> onnx.ModelProto:
    """onnx.checker plus strict shape inference; errors become :class:`InputError`.

    Both run on a copy without the big weights (they only need their types and shapes), so a
    model is never copied whole and models over 2 GB, which protobuf cannot serialize, work too.
    The inferred value_info is written into ``model``, which is returned.
    """
    light = strip_large_initializers(model)
    try:
        onnx.checker.check_model(light)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"{what}: fails onnx.checker: {_first_line(e)}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
        raise InputError(f"{what}: shape inference failed: {_first_line(e)}") from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in outputs:
            o.CopyFrom(outputs[o.name])
    return model


def _convert_opset(model: onnx.ModelProto, opset: int, *, what: str) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)
        return onnx.shape_inference.infer_shapes(converted)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors and more
        # Passes assume opset-13 forms of Split, Squeeze, Slice and the reductions: going on with
        # the old opset would make them misread the graph.
        raise InputError(
            f"{what}: cannot convert opset {_default_opset(model)} to {opset} "
            f"({_first_line(e)}); re-export the model at opset {opset} or newer"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialize deterministically (sorted map fields), IR version clamped to what ORT 1.19 loads."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model.SerializeToString(deterministic=True)


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (also for models over 2 GB, which cannot be serialized whole)."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf refuses sizes past 2 GB in some versions
        light = strip_large_initializers(model)
        return light.ByteSize() + sum(
            len(i.raw_data) for i in model.graph.initializer if int(np.prod(i.dims, dtype=np.int64)) > 4096
        )


def is_large(model: onnx.ModelProto) -> bool:
    """True if the model cannot be written as one protobuf (2 GB limit): weights go to a .data file."""
    return model_size(model) > _TWO_GB


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write atomically: a temporary file in the target folder, then a rename.

    Models over 2 GB are written with their weights in ``<name>.data`` beside them (also renamed
    into place only when complete). Never call this with the input model's path.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    if not is_large(model):
        atomic_write(p, model_bytes(model))
        return
    data_name = p.name + ".data"
    with tempfile.TemporaryDirectory(dir=p.parent, prefix=".graphslim-") as tmp:
        tmp_model = Path(tmp) / p.name
        onnx.save_model(
            model,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        os.replace(Path(tmp) / data_name, p.parent / data_name)
        os.replace(tmp_model, p)


# --------------------------------------------------------------------------- the graph facade


class Graph:
    """A mutable ONNX graph with use-def links (over onnx-graphsurgeon).

    ``version`` counts mutations made through the facade; analyses cached by the pass context are
    keyed on it.
    """

    def __init__(self, g: gs.Graph, model_meta: dict[str, Any]):
        self._g = g
        self._meta = model_meta
        self.version = 0
        self._names: set[str] | None = None

    # ---- conversion
    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> Graph:
        meta = {
            "ir_version": min(model.ir_version, MAX_IR_VERSION),
            "producer_name": model.producer_name,
            "producer_version": model.producer_version,
            "domain": model.domain,
            "model_version": model.model_version,
            "doc_string": model.doc_string,
            "metadata_props": [(p.key, p.value) for p in model.metadata_props],
            "opset_import": [(o.domain, o.version) for o in model.opset_import],
        }
        return cls(gs.import_onnx(model), meta)

    def to_model(self) -> onnx.ModelProto:
        """Export (topologically sorted) with the original model-level fields and opset imports."""
        self._g.toposort()
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self._meta["opset_import"]]
        model = gs.export_onnx(self._g, do_type_check=False, opset_imports=opsets)
        model.ir_version = self._meta["ir_version"]
        model.producer_name = self._meta["producer_name"]
        model.producer_version = self._meta["producer_version"]
        model.domain = self._meta["domain"]
        model.model_version = self._meta["model_version"]
        model.doc_string = self._meta["doc_string"]
        del model.metadata_props[:]
        for k, v in self._meta["metadata_props"]:
            model.metadata_props.add(key=k, value=v)
        return model

    def copy(self) -> Graph:
        """An independent copy. Constant arrays are shared, which is safe: they are never mutated."""
        g = Graph(self._g.copy(), dict(self._meta))
        g._copied_from = (id(self), self.version)
        return g

    # ---- read access
    @property
    def nodes(self) -> list[Node]:
        return self._g.nodes

    @property
    def inputs(self) -> list[Tensor]:
        return self._g.inputs

    @property
    def outputs(self) -> list[Tensor]:
        return self._g.outputs

    @property
    def opset(self) -> int:
        for d, v in self._meta["opset_import"]:
            if d in ("", "ai.onnx"):
                return v
        return self._g.opset

    def tensors(self) -> dict[str, Tensor]:
        return self._g.tensors()

    def producer(self, t: Tensor) -> Node | None:
        """The node that computes ``t``, or None for graph inputs and constants."""
        return t.inputs[0] if t.inputs else None

    def consumers(self, t: Tensor) -> list[Node]:
        """Nodes that read ``t`` (a node reading it twice appears once)."""
        seen: list[Node] = []
        for n in t.outputs:
            if not any(n is s for s in seen):
                seen.append(n)
        return seen

    def is_graph_output(self, t: Tensor) -> bool:
        return any(t is o for o in self._g.outputs)

    def is_graph_input(self, t: Tensor) -> bool:
        return any(t is i for i in self._g.inputs)

    def constant(self, t: Tensor | None) -> np.ndarray | None:
        """The value of ``t`` if it is a compile-time constant (initializer or Constant node)."""
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            if isinstance(t._values, np.ndarray):
                return t._values
            # graphsurgeon loads a lazy initializer anew on every access: load it once and keep it.
            try:
                arr = np.asarray(t.values)
            except (ValueError, TypeError) as e:
                raise InputError(f"initializer '{t.name}': its data does not match its shape or type ({e})") from None
            t.values = arr
            return arr
        prod = self.producer(t)
        if prod is not None and prod.op == "Constant" and "value" in prod.attrs:
            val = prod.attrs["value"]
            if isinstance(val, gs.Constant):
                return np.asarray(val.values)
        return None

    def shape(self, t: Tensor) -> tuple[int | str, ...] | None:
        """Static shape where known (dims are ints, or strings for symbolic dims)."""
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        if t.shape is None:
            return None
        return tuple(d if isinstance(d, int | str) and d != -1 else "?" for d in t.shape)

    def int_shape(self, t: Tensor, bindings: dict[str, int] | None = None) -> tuple[int, ...] | None:
        """Shape with symbolic dims evaluated: names (and expressions of them, such as ``B*S``)
        take their value from ``bindings``, unbound names are 1. None if a dim is unknown."""
        shp = self.shape(t)
        if shp is None:
            return None
        out: list[int] = []
        for d in shp:
            if isinstance(d, int) and d >= 0:
                out.append(d)
                continue
            v = eval_dim(d, bindings or {}) if isinstance(d, str) else None
            if v is None:
                return None
            out.append(v)
        return tuple(out)

    def rank(self, t: Tensor) -> int | None:
        shp = self.shape(t)
        return None if shp is None else len(shp)

    # ---- names
    def fresh_name(self, hint: str) -> str:
        """A node/tensor name not used yet: ``hint`` itself, or ``hint_1``, ``hint_2``..."""
        if self._names is None:
            self._names = set(self._g.tensors().keys()) | {n.name for n in self._g.nodes}
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    # ---- mutation
    def _touch(self) -> None:
        self.version += 1

    def make_constant(self, values: np.ndarray, hint: str) -> Constant:
        return gs.Constant(self.fresh_name(hint), np.ascontiguousarray(values))

    def make_variable(self, hint: str, dtype: Any = None, shape: Sequence[int | str] | None = None) -> Variable:
        return gs.Variable(self.fresh_name(hint), dtype=dtype, shape=shape)

    def add_node(
        self,
        op: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
        domain: str | None = None,
    ) -> Node:
        node = gs.Node(
            op=op,
            name=self.fresh_name(name or op),
            attrs=dict(attrs or {}),
            inputs=list(inputs),
            outputs=list(outputs),
            domain=domain,
        )
        self._g.nodes.append(node)
        self._touch()
        return node

    def set_input(self, node: Node, index: int, t: Tensor) -> None:
        """Set input ``index`` of ``node``; ``index == len(node.inputs)`` appends it."""
        if index == len(node.inputs):
            node.inputs.append(t)
        else:
            node.inputs[index] = t
        self._touch()

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        node.attrs[key] = value
        self._touch()

    def replace_attrs(self, node: Node, attrs: dict[str, Any]) -> None:
        """Replace all attributes of ``node``."""
        node.attrs.clear()
        node.attrs.update(attrs)
        self._touch()

    def assign(self, other: Graph) -> None:
        """Make this graph a copy of ``other`` (e.g. roll back to a snapshot from :meth:`copy`)."""
        snap = other.copy()
        self._g = snap._g
        self._meta = dict(snap._meta)
        self._names = None
        self._touch()
        origin = getattr(other, "_copied_from", None)
        # (version now, version of the snapshot): while the version stays this, the graph holds
        # what it held at the snapshot's version (a rollback is no change; see restored_from).
        self._restored = (self.version, origin[1]) if origin is not None and origin[0] == id(self) else None

    def restored_from(self) -> int | None:
        """The version whose content the graph holds again after :meth:`assign` of a snapshot
        :meth:`copy` took of this graph, as long as nothing changed it since; else None."""
        r = getattr(self, "_restored", None)
        return r[1] if r is not None and r[0] == self.version else None

    def replace_model(self, model: onnx.ModelProto) -> None:
        """Make this graph the given model (for passes that delegate to a library working on
        ModelProto, such as onnxruntime.quantization). Graph inputs and outputs must keep their
        names; the caller checks that."""
        other = Graph.from_model(model)
        self._g = other._g
        self._meta = other._meta
        self._names = None
        self._touch()

    def set_constant(self, node: Node, index: int, values: np.ndarray) -> Constant:
        """Give ``node`` a new constant value for input ``index``.

        The old tensor is edited in place only if nothing else reads it; otherwise the node gets a
        fresh constant, so sharing nodes are unaffected.
        """
        old = node.inputs[index]
        values = np.ascontiguousarray(values)
        users = [n for n in old.outputs if n is not node] if isinstance(old, gs.Constant) else [None]
        if isinstance(old, gs.Constant) and not users and not self.is_graph_output(old):
            old.values = values
            new = old
        else:
            new = self.make_constant(values, old.name or f"{node.name}_in{index}")
            node.inputs[index] = new
        self._touch()
        return new

    def set_tensor_value(self, t: Constant, values: np.ndarray) -> None:
        """Change a constant's value for every node that reads it (e.g. trained weights)."""
        if not isinstance(t, gs.Constant):
            raise TypeError(f"'{t.name}' is not a constant")
        values = np.ascontiguousarray(values, dtype=np.asarray(t.values).dtype)
        if values.shape != tuple(t.shape):
            raise ValueError(f"'{t.name}': shape {values.shape} does not match {tuple(t.shape)}")
        t.values = values
        self._touch()

    def replace_all_uses(self, old: Tensor, new: Tensor) -> None:
        """Make every consumer of ``old`` read ``new`` instead. ``old`` must not be a graph output."""
        if self.is_graph_output(old):
            raise ValueError(f"'{old.name}' is a graph output; use reroute_output")
        for n in list(old.outputs):
            for i, t in enumerate(n.inputs):
                if t is old:
                    n.inputs[i] = new
        self._touch()

    def bypass(self, node: Node, in_index: int = 0, out_index: int = 0) -> str | None:
        """Remove a node whose output equals one of its inputs. Returns None, or why it could not.

        If the output is a graph output, the input's producer is made to write the graph output
        directly (so the graph's interface keeps its names).
        """
        src, dst = node.inputs[in_index], node.outputs[out_index]
        if self.is_graph_output(dst):
            prod = self.producer(src)
            if prod is None or self.is_graph_output(src):
                return "its output is a graph output fed directly by a graph input or constant"
            # Producer writes dst directly; other readers of src read dst.
            for c in list(src.outputs):
                if c is node:
                    continue
                for i, t in enumerate(c.inputs):
                    if t is src:
                        c.inputs[i] = dst
            idx = next(i for i, t in enumerate(prod.outputs) if t is src)
            node.outputs.clear()
            node.inputs.clear()
            prod.outputs[idx] = dst
            if dst.dtype is None:
                dst.dtype = src.dtype
        else:
            self.replace_all_uses(dst, src)
            node.outputs.clear()
            node.inputs.clear()
        self._g.nodes.remove(node)
        self._touch()
        return None

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Disconnect and drop nodes. Tensors they alone used are dropped by :meth:`cleanup`."""
        drop = list(nodes)
        for n in drop:
            n.inputs.clear()
            n.outputs.clear()
        ids = {id(n) for n in drop}
        self._g.nodes = [n for n in self._g.nodes if id(n) not in ids]
        self._touch()

    def cleanup(self) -> int:
        """Drop nodes that do not contribute to a graph output. Returns how many were dropped."""
        before = len(self._g.nodes)
        self._g.cleanup(remove_unused_graph_inputs=False)
        removed = before - len(self._g.nodes)
        if removed:
            self._touch()
        return removed

    def toposort(self) -> None:
        self._g.toposort()

    def fold_constants(self, size_threshold: int | None = 16 * 2**20) -> None:
        """Evaluate constant subgraphs (onnx-graphsurgeon's folder, which runs ONNX Runtime). The
        version moves only if something folded (the pass manager reads it as "changed").

        With ``size_threshold`` (bytes), no node whose result is larger, or of a size the shapes
        do not tell, is evaluated, nor anything after it: the bound holds for every intermediate
        result, not only the constants that end up in the model (a ConstantOfShape of gigabytes
        feeding a ReduceSum stays unevaluated)."""

        def too_big(node: Node) -> bool:
            for t in node.outputs:
                shape = t.shape
                if shape is None or t.dtype is None or any(not isinstance(d, int) or d < 0 for d in shape):
                    return True
                try:
                    itemsize = np.dtype(t.dtype).itemsize
                except TypeError:
                    return True
                if int(np.prod(shape, dtype=np.float64)) * itemsize > size_threshold:
                    return True
            return False

        def state() -> tuple[int, int]:
            tensors = self._g.tensors().values()
            return len(self._g.nodes), sum(isinstance(t, gs.Constant) for t in tensors)

        from graphslim.core.runtime import require_onnxruntime

        require_onnxruntime()  # the folder's sessions log through ONNX Runtime's default logger
        before = state()
        self._g.fold_constants(
            size_threshold=size_threshold, should_exclude_node=too_big if size_threshold is not None else None
        )
        if state() != before:
            self._touch()

    def fingerprint(self) -> str:
        """A hash of everything a pass can change: nodes (op, domain, name, attributes, inputs,
        outputs, in order), graph inputs and outputs, and every constant's name, type, shape and
        bytes. The pass manager checks a pass's ``changed`` flag against it under --verify."""
        h = hashlib.sha256()
        for t in [*self._g.inputs, *self._g.outputs]:
            h.update(f"io:{t.name}:{t.dtype}:{t.shape}".encode())
        seen: set[int] = set()
        for n in self._g.nodes:
            attrs = sorted(
                (k, repr(v) if not isinstance(v, gs.Tensor) else f"tensor:{v.name}") for k, v in n.attrs.items()
            )
            h.update(f"node:{n.op}:{n.domain}:{n.name}:{attrs}".encode())
            for t in [*n.inputs, *n.outputs]:
                h.update(f"|{t.name}".encode())
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    val = self.constant(t)
                    h.update(f"{val.dtype}{val.shape}".encode())
                    h.update(np.ascontiguousarray(val).tobytes())
        return h.hexdigest()

    def fold_constant_subexpressions(self) -> int:
        """Fold float constant subexpressions (an Unsqueeze or Reshape of an initializer feeding a
        Mul, as zoo exports write BatchNorm scales) so analyses see the constants they are,
        whatever ran before. Returns how many nodes went away."""
        foldable = any(
            n.op != "Constant"
            and n.inputs
            and all(self.constant(t) is not None for t in n.inputs if t.name)
            and any(o.dtype is not None and np.dtype(o.dtype).kind == "f" for o in n.outputs)
            for n in self._g.nodes
        )
        if not foldable:
            return 0
        before = len(self._g.nodes)
        self.fold_constants()
        self.cleanup()
        self.infer_shapes()
        return before - len(self._g.nodes)

    @contextlib.contextmanager
    def _without_weights(self, limit: int = 4096) -> Iterator[onnx.ModelProto]:
        """The model with every constant over ``limit`` elements turned into a typed graph input,
        exported without copying any weight (shape inference and size estimates need no values).
        The graph is restored on exit."""
        big = [
            t
            for t in self._g.tensors().values()
            if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) > limit
        ]
        saved = [(t, t._values, t.dtype, list(t.shape)) for t in big]
        inputs = list(self._g.inputs)
        try:
            for t, _, dtype, shape in saved:
                t.to_variable(dtype=dtype, shape=shape)  # in place: every link stays
                t.type = "tensor_type"
            self._g.inputs = inputs + big
            yield self.to_model()
        finally:
            self._g.inputs = inputs
            for t, values, _, _ in saved:
                t.to_constant(values)

    def serialized_size(self) -> int:
        """Bytes of the serialized model, without serializing (or copying) the weights."""
        big = [
            t
            for t in self._g.tensors().values()
            if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) > 4096
        ]
        weights = sum(int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize for t in big)
        with self._without_weights() as light:
            # Each weight moves from a graph input (a value_info) to an initializer: close enough.
            return light.ByteSize() + weights

    def infer_shapes(self) -> None:
        """Recompute the shapes and dtypes of every intermediate tensor (after rewrites).

        ONNX's shape inference first; where it leaves dims unknown (a Reshape whose target is
        computed at run time from Shape/Gather/Concat, as every transformer export writes them),
        ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``, the
        tool ORT's own transformer optimizer uses) fills them in as expressions of the input dims
        (``B``, ``S``, ``B*S``)."""
        keep = {id(t) for t in list(self._g.inputs) + list(self._g.outputs)}
        for t in self._g.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in keep:
                t.shape = None
        with self._without_weights() as light:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
            known = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
            if any(
                _has_unknown_dims(known.get(t.name))
                for t in self._g.tensors().values()
                if isinstance(t, gs.Variable) and id(t) not in keep
            ):
                known.update(_symbolic_shapes(light))
        for name, t in self._g.tensors().items():
            if not isinstance(t, gs.Variable) or id(t) in keep or name not in known:
                continue
            tt = known[name].type.tensor_type
            if tt.elem_type:
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if tt.HasField("shape"):
                t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def _has_unknown_dims(vi: onnx.ValueInfoProto | None) -> bool:
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return vi is not None
    return any(
        not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__"))
        for d in vi.type.tensor_type.shape.dim
    )


_SYMBOLIC_WARNED: list[bool] = []


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos from ONNX Runtime's symbolic shape inference; {} where it cannot run."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except ImportError as e:  # onnxruntime without sympy: say so once, the counts will show 0s
        if not _SYMBOLIC_WARNED:
            _SYMBOLIC_WARNED.append(True)
            log.warning("symbolic shape inference unavailable (%s): shapes behind computed Reshapes stay unknown", e)
        return {}
    except Exception as e:  # noqa: BLE001 - an optional refinement: any failure keeps ONNX's shapes
        log.debug("symbolic shape inference failed: %s", _first_line(e))
        return {}
    if out is None:
        return {}
    return {vi.name: vi for vi in out.graph.value_info if not _has_unknown_dims(vi)}


_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def eval_dim(expr: str, bindings: dict[str, int]) -> int | None:
    """The value of a symbolic dim (``S``, ``B*S``, ``floor(S/2) + 1``) with names bound by
    ``bindings`` and unbound names 1; None for unknown dims (``?``, ``unk__3``) or anything that is
    not plain arithmetic."""
    if not expr or expr == "?" or expr.startswith("unk__"):
        return None
    if _DIM_NAME.match(expr):
        return int(bindings.get(expr, 1))
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> float:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int | float):
            return n.value
        if isinstance(n, ast.Name):
            if n.id.startswith("unk__"):
                raise ValueError(n.id)
            return bindings.get(n.id, 1)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {
                ast.Add: lambda: a + b,
                ast.Sub: lambda: a - b,
                ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b,
                ast.FloorDiv: lambda: a // b,
                ast.Mod: lambda: a % b,
            }
            fn = ops.get(type(n.op))
            if fn is not None:
                return fn()
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _DIM_FUNCS:
            return _DIM_FUNCS[n.func.id](*(ev(a) for a in n.args))
        raise ValueError(ast.dump(n))

    try:
        v = ev(tree)
    except (ValueError, ZeroDivisionError, TypeError):
        return None
    return int(v) if v >= 0 and float(v).is_integer() else None


_DIM_FUNCS: dict[str, Callable[..., float]] = {
    "floor": math.floor,
    "ceil": math.ceil,
    "Max": max,
    "Min": min,
    "max": max,
    "min": min,
}


def strip_large_initializers(model: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """A model without its big initializers (they become typed graph inputs), for shape inference.

    Shape inference needs the values of shape-like tensors only (small integer vectors), and
    copying the weights would double peak memory on big models.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for init in src.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= limit:
            dst.initializer.append(init)
        elif init.name not in declared:
            dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light
