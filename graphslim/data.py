"""Data sets for calibration, verification and accuracy: ``.npz`` files, one array per model input.

An ``.npz`` holds one array per model input name (first axis = samples) and optionally ``labels``
(integer class ids). Loading checks names, sample counts and dtypes against the model and fails
with one clear line.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphslim.errors import InputError

__all__ = ["Dataset", "load_data", "load_npz", "random_inputs"]

LABELS = "labels"
MAX_SAMPLE_ELEMENTS = 2**26  # random inputs larger than this (per input) are refused, not allocated


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Dataset:
        return self.slice(0, min(n, len(self)))

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset({k: v[indices] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[indices])

    def slice(self, start: int, stop: int) -> Dataset:
        return Dataset({k: v[start:stop] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[start:stop])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Dataset]:
        """Batches in order, or shuffled deterministically by ``seed``."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield Dataset({k: v[idx] for k, v in self.inputs.items()},
                          None if self.labels is None else self.labels[idx])


def _input_specs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list[int | str]]]:
    inits = {i.name for i in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        specs[vi.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims)
    return specs


def load_npz(path: str | Path, model: onnx.ModelProto) -> Dataset:
    """Load and validate an ``.npz`` data set for ``model``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such data file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{p}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    specs = _input_specs(model)
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputError(f"{p}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays) or 'none'})")
    unknown = [k for k in arrays if k not in specs and k != LABELS]
    if unknown:
        raise InputError(f"{p}: arrays {', '.join(unknown)} match no model input (inputs: {', '.join(specs)})")
    inputs: dict[str, np.ndarray] = {}
    counts = set()
    for name, (dtype, dims) in specs.items():
        arr = arrays[name]
        if arr.ndim != len(dims):
            raise InputError(f"{p}: array '{name}' has rank {arr.ndim}, the model input has rank {len(dims)}")
        for i, d in enumerate(dims):
            if i > 0 and isinstance(d, int) and d > 0 and arr.shape[i] != d:
                raise InputError(f"{p}: array '{name}' has shape {arr.shape}, the model expects {dims}")
        if arr.dtype != dtype:
            if arr.dtype.kind in "fiu" and np.dtype(dtype).kind in "fiu":
                arr = arr.astype(dtype)
            else:
                raise InputError(f"{p}: array '{name}' has dtype {arr.dtype}, the model expects {np.dtype(dtype)}")
        inputs[name] = arr
        counts.add(arr.shape[0])
    labels = arrays.get(LABELS)
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise InputError(f"{p}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        counts.add(labels.shape[0])
    if len(counts) != 1:
        raise InputError(f"{p}: arrays have different sample counts {sorted(counts)}")
    if counts == {0}:
        raise InputError(f"{p}: the data set is empty")
    return Dataset(inputs, labels)


def random_inputs(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> Dataset:
    """Deterministic random inputs (symbolic dims = n for the first axis, 1 elsewhere)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (dtype, dims) in _input_specs(model).items():
        shape = [d if isinstance(d, int) and d > 0 else (n if i == 0 else 1) for i, d in enumerate(dims)]
        if int(np.prod(shape, dtype=np.float64)) > MAX_SAMPLE_ELEMENTS:
            raise InputError(f"input '{name}' declares shape {dims}: too large to sample "
                             f"(more than {MAX_SAMPLE_ELEMENTS:,} elements); give --data")
        kind = np.dtype(dtype).kind
        if kind == "f":
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif kind in "iu":
            inputs[name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif kind == "b":
            inputs[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputError(f"input '{name}' has dtype {np.dtype(dtype)}, which graphslim cannot sample")
    return Dataset(inputs)


def _concat(parts: list[Dataset], where: str) -> Dataset:
    if not parts:
        raise InputError(f"{where}: no data")
    keys = set(parts[0].inputs)
    if any(set(p.inputs) != keys for p in parts) or len({p.labels is None for p in parts}) > 1:
        raise InputError(f"{where}: the parts do not all have the same arrays")
    inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return Dataset(inputs, labels)


def _from_entry_point(spec: str, model: onnx.ModelProto) -> Dataset:
    import importlib

    module_name, _, func_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{spec}: cannot load the data function ({e})") from None
    specs = _input_specs(model)
    parts = []
    for i, batch in enumerate(fn()):
        if not isinstance(batch, dict):
            raise InputError(f"{spec}: batch {i} is a {type(batch).__name__}, expected a dict of arrays")
        missing = [n for n in specs if n not in batch]
        if missing:
            raise InputError(f"{spec}: batch {i} has no array for input(s) {', '.join(missing)}")
        inputs = {n: np.asarray(batch[n]).astype(specs[n][0], copy=False) for n in specs}
        labels = np.asarray(batch[LABELS]) if LABELS in batch else None
        parts.append(Dataset(inputs, labels))
    return _concat(parts, spec)


def load_data(spec: str | Path, model: onnx.ModelProto) -> Dataset:
    """A data set from an ``.npz`` file, a folder of ``.npz`` shards (read in name order), or a
    Python entry point ``module:function`` returning an iterable of batches (dicts of arrays named
    after the model inputs, optionally ``labels``). Shards and batches are concatenated in memory."""
    p = Path(spec)
    if p.is_dir():
        shards = sorted(p.glob("*.npz"))
        if not shards:
            raise InputError(f"{p}: the folder has no .npz shards")
        return _concat([load_npz(s, model) for s in shards], str(p))
    if not p.exists() and ":" in str(spec) and not str(spec).endswith(".npz"):
        return _from_entry_point(str(spec), model)
    return load_npz(p, model)
