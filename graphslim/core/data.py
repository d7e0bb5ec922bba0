"""Data sets for calibration, verification and accuracy: ``.npz`` files, one array per model input.

An ``.npz`` holds one array per model input name (first axis = samples) and optionally ``labels``
(integer class ids). Loading checks names, sample counts and dtypes against the model and fails
with one clear line. What a data set may not hold, also refused with one line: a ``.npy`` or any
non-zip file given as ``.npz``, arrays of Python objects, NaN or Inf in float arrays (named, with
how many), labels outside the model's class range, and arrays whose declared size does not fit
in memory or that expand from a small compressed member far beyond it (a zip bomb); sizes are
read from the ``.npy`` headers, before any array is.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphslim.core.errors import InputError
from graphslim.core.memory import available_bytes, format_bytes

__all__ = [
    "Dataset",
    "ShardedDataset",
    "check_labels",
    "load_data",
    "load_npz",
    "load_shards",
    "num_classes",
    "random_inputs",
]

LABELS = "labels"
MAX_SAMPLE_ELEMENTS = 2**26  # random inputs larger than this (per input) are refused, not allocated
# A compressed member may expand this many times, beyond BOMB_MIN_BYTES: real data (even sparse
# images) compresses far less; a zip bomb compresses about 1000x (deflate) or more (bzip2).
BOMB_RATIO = 100
BOMB_MIN_BYTES = 256 * 2**20
_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}
_FINITE_CHUNK = 1 << 22  # elements checked for NaN/Inf at a time (bounds the temporary)


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Dataset:
        return self.slice(0, min(n, len(self)))

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(
            {k: v[indices] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[indices]
        )

    def slice(self, start: int, stop: int) -> Dataset:
        return Dataset(
            {k: v[start:stop] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[start:stop]
        )

    def index_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, Dataset]]:
        """(sample indices, batch) pairs in order, or shuffled deterministically by ``seed``."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield idx, self.subset(idx)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Dataset]:
        """Batches in order, or shuffled deterministically by ``seed``."""
        for _, batch in self.index_batches(batch_size, shuffle=shuffle, seed=seed):
            yield batch

    def split(self, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """(train, eval): a seeded random ``eval_fraction`` held out."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n)
        n_eval = min(max(1, int(round(eval_fraction * n))), n - 1)
        return self.subset(order[n_eval:]), self.subset(order[:n_eval])

    def fingerprint(self, h: Any) -> None:
        """Feed everything that identifies the data into hash ``h``."""
        for name in sorted(self.inputs):
            arr = np.ascontiguousarray(self.inputs[name])
            h.update(f"{name}{arr.dtype}{arr.shape}".encode())
            h.update(arr.tobytes())
        if self.labels is not None:
            h.update(b"labels" + np.ascontiguousarray(self.labels).tobytes())


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


def _check_names(p: Path, arrays: Any, specs: dict[str, Any]) -> None:
    """Every model input has an array, and every array is an input or ``labels``."""
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputError(
            f"{p}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays) or 'none'})"
        )
    unknown = [k for k in arrays if k not in specs and k != LABELS]
    if unknown:
        raise InputError(f"{p}: arrays {', '.join(unknown)} match no model input (inputs: {', '.join(specs)})")


def load_npz(path: str | Path, model: onnx.ModelProto) -> Dataset:
    """Load and validate an ``.npz`` data set for ``model``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such data file")
    members = _npz_headers(p)
    _check_sizes(p, members)
    specs = _input_specs(model)
    _check_names(p, members, specs)  # before reading: only the arrays the model needs are read
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in members}
    except MemoryError:
        raise InputError(f"{p}: the arrays do not fit in memory; split the data into a folder of shards") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise InputError(
            f"{p}: not a readable .npz file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None
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
        _check_finite(p, name, arr)
        inputs[name] = arr
        counts.add(arr.shape[0] if arr.ndim else -1)
    labels = arrays.get(LABELS)
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise InputError(f"{p}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        check_labels(p, labels, model)
        counts.add(labels.shape[0])
    if -1 in counts:
        raise InputError(f"{p}: arrays must have a first (samples) axis; a scalar has none")
    if len(counts) != 1:
        raise InputError(f"{p}: arrays have different sample counts {sorted(counts)}")
    if counts == {0}:
        raise InputError(f"{p}: the data set is empty")
    return Dataset(inputs, labels)


def _check_finite(where: Path | str, name: str, arr: np.ndarray) -> None:
    """NaN or Inf in a float array is a data error (it would surface later as a pass that
    'broke' the model, or a calibration that fails): name the array, count, first sample."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return
    flat = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    rows = max(1, _FINITE_CHUNK // max(1, flat.shape[1]))
    bad, first = 0, None
    for start in range(0, len(flat), rows):
        ok = np.isfinite(flat[start : start + rows])
        if not ok.all():
            per_row = (~ok).sum(axis=1)
            bad += int(per_row.sum())
            if first is None:
                first = start + int(np.flatnonzero(per_row)[0])
    if bad:
        raise InputError(
            f"{where}: array '{name}' has {bad:,} NaN or Inf values (first in sample {first}); "
            "graphslim needs finite data"
        )


def num_classes(model: onnx.ModelProto) -> int | None:
    """Classes of the model's first output when it is (samples, classes) with a static class count."""
    if not model.graph.output:
        return None
    tt = model.graph.output[0].type.tensor_type
    dims = tt.shape.dim if tt.HasField("shape") else []
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    return None


def check_labels(where: Path | str, labels: np.ndarray, model: onnx.ModelProto | int | None) -> None:
    """Labels are class ids: from 0 to the model's classes - 1 (accuracy compares them with the
    argmax of the first output). Labels outside that range would pass an accuracy budget
    silently (both models miss them alike), so they are refused."""
    if labels.size == 0:
        return
    classes = model if isinstance(model, int) or model is None else num_classes(model)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (classes is not None and high >= classes):
        bad = int(np.count_nonzero((labels < 0) | (labels >= (classes if classes is not None else np.inf))))
        value = low if low < 0 else high
        scope = f"from 0 to {classes - 1} (the model has {classes} classes)" if classes is not None else ">= 0"
        raise InputError(f"{where}: labels must be class ids {scope}; {bad:,} are not (e.g. {value})")


def random_inputs(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> Dataset:
    """Deterministic random inputs (symbolic dims = n for the first axis, 1 elsewhere)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (dtype, dims) in _input_specs(model).items():
        shape = [d if isinstance(d, int) and d > 0 else (n if i == 0 else 1) for i, d in enumerate(dims)]
        if int(np.prod(shape, dtype=np.float64)) > MAX_SAMPLE_ELEMENTS:
            raise InputError(
                f"input '{name}' declares shape {dims}: too large to sample "
                f"(more than {MAX_SAMPLE_ELEMENTS:,} elements); give --data"
            )
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
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module may raise anything on import
        raise InputError(f"{spec}: cannot load the data function ({type(e).__name__}: {str(e)[:200]})") from None
    specs = _input_specs(model)
    parts = []
    try:
        for i, batch in enumerate(fn()):
            if not isinstance(batch, dict):
                raise InputError(f"{spec}: batch {i} is a {type(batch).__name__}, expected a dict of arrays")
            missing = [n for n in specs if n not in batch]
            if missing:
                raise InputError(f"{spec}: batch {i} has no array for input(s) {', '.join(missing)}")
            inputs = {}
            for n in specs:
                arr = np.asarray(batch[n])
                if arr.dtype.kind not in "fiub":
                    raise InputError(f"{spec}: batch {i}: array '{n}' has dtype {arr.dtype}; expected numbers")
                inputs[n] = arr.astype(specs[n][0], copy=False)
            labels = np.asarray(batch[LABELS]) if LABELS in batch else None
            if labels is not None and (labels.dtype.kind not in "iu" or labels.ndim != 1):
                raise InputError(f"{spec}: batch {i}: 'labels' must be a 1-D integer array, got {labels.dtype}")
            parts.append(Dataset(inputs, labels))
    except InputError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's function may raise anything
        raise InputError(f"{spec}: the data function failed ({type(e).__name__}: {str(e)[:200]})") from None
    data = _concat(parts, spec)
    for name, arr in data.inputs.items():
        _check_finite(spec, name, arr)
    if data.labels is not None:
        check_labels(spec, data.labels, model)
    return data


@dataclass(frozen=True)
class _Member:
    shape: tuple[int, ...]
    dtype: np.dtype
    stored: int  # bytes in the archive (compressed)
    size: int  # bytes once decompressed, as the archive records it


def _npz_headers(path: Path) -> dict[str, _Member]:
    """Shapes and dtypes of the arrays in an .npz, read from the .npy headers without the data."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise InputError(
            f"{path}: a .npy file (one unnamed array), not an .npz; save the arrays by input name: "
            "np.savez(path, input=array, labels=labels)"
        )
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file (not a zip archive of .npy arrays)")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    # numpy writes stored or deflate members. zipfile decompresses bzip2 and LZMA
                    # without a size limit: even the header of a bzip2 bomb would expand whole.
                    raise InputError(
                        f"{path}: member '{info.filename[:80]}' is compressed with "
                        f"{_ZIP_METHODS.get(info.compress_type, f'method {info.compress_type}')}; "
                        "graphslim reads .npz files as numpy writes them (np.savez, np.savez_compressed)"
                    )
                if not info.filename.endswith(".npy"):  # np.load would hand it back as raw bytes
                    out[info.filename] = _Member(
                        (info.file_size,), np.dtype(np.uint8), info.compress_size, info.file_size
                    )
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(f)
                out[info.filename[:-4]] = _Member(tuple(shape), np.dtype(dtype), info.compress_size, info.file_size)
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, TypeError) as e:
        raise InputError(f"{path}: not a readable .npz file ({str(e)[:200] or type(e).__name__})") from None
    return out


def _check_sizes(path: Path, members: dict[str, _Member]) -> None:
    """Refuse, before reading any array: Python objects, arrays whose data is missing from the
    archive, members that expand far beyond their stored size (zip bombs), and arrays that would
    not fit in the memory available."""
    total = 0
    for name, m in members.items():
        if m.dtype.hasobject:
            raise InputError(
                f"{path}: array '{name}' holds Python objects (dtype {m.dtype}); graphslim loads numeric arrays only"
            )
        declared = int(np.prod(m.shape, dtype=np.float64)) * m.dtype.itemsize
        if declared > m.size:
            raise InputError(
                f"{path}: array '{name}' declares {format_bytes(declared)} but its member holds "
                f"{format_bytes(m.size)} (truncated or forged)"
            )
        if m.size > BOMB_MIN_BYTES and m.size > BOMB_RATIO * max(1, m.stored):
            raise InputError(
                f"{path}: array '{name}' expands from {format_bytes(m.stored)} to {format_bytes(m.size)} "
                f"({m.size // max(1, m.stored):,}x): refused as a likely zip bomb; store it uncompressed "
                "(np.savez) or as a folder of shards"
            )
        total += m.size
    room = available_bytes()
    if room is not None and total > room:
        raise InputError(
            f"{path}: its arrays take {format_bytes(total)}, more than the {format_bytes(room)} of memory "
            "available; split the data into a folder of .npz shards"
        )


class ShardedDataset:
    """A data set in a folder of ``.npz`` shards, read one shard at a time.

    Batches stream: the shard order and the order inside each shard are shuffled by the seed,
    and only one shard's arrays are in memory at once. Labels (one integer per sample) are kept
    in memory. It offers what graphslim's passes use of :class:`Dataset`: ``len``, ``labels``,
    ``take``, ``index_batches``/``batches``, ``split`` (whole shards held out) and ``fingerprint``.
    """

    def __init__(self, shards: list[Path], counts: list[int], model: onnx.ModelProto):
        self.shards, self.counts, self._model = shards, counts, model
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._labels: np.ndarray | None = None
        self._has_labels = LABELS in _npz_headers(shards[0])  # checked by load_shards

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _load(self, i: int) -> Dataset:
        return load_npz(self.shards[i], self._model)

    @property
    def labels(self) -> np.ndarray | None:
        if self._has_labels and self._labels is None:
            parts = []
            for p in self.shards:
                with np.load(p, allow_pickle=False) as z:
                    parts.append(z[LABELS])
            self._labels = np.concatenate(parts)
        return self._labels

    def take(self, n: int) -> Dataset:
        parts, have = [], 0
        for i in range(len(self.shards)):
            if have >= n:
                break
            d = self._load(i)
            parts.append(d.take(n - have))
            have += len(parts[-1])
        return _concat(parts, str(self.shards[0].parent))

    def slice(self, start: int, stop: int) -> Dataset:
        return self.take(stop).slice(start, stop)

    def index_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, Dataset]]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        for i in order:
            d = self._load(int(i))
            local = rng.permutation(len(d)) if shuffle else np.arange(len(d))
            for start in range(0, len(d), batch_size):
                idx = local[start : start + batch_size]
                yield idx + self.starts[i], d.subset(idx)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Dataset]:
        for _, batch in self.index_batches(batch_size, shuffle=shuffle, seed=seed):
            yield batch

    def subset(self, indices: np.ndarray) -> Dataset:
        indices = np.asarray(indices)
        parts = []
        for i in range(len(self.shards)):
            lo, hi = self.starts[i], self.starts[i + 1]
            local = indices[(indices >= lo) & (indices < hi)] - lo
            if len(local):
                parts.append(self._load(i).subset(local))
        return _concat(parts, str(self.shards[0].parent))

    def split(self, eval_fraction: float, seed: int) -> tuple[ShardedDataset, ShardedDataset]:
        """Whole shards held out (seeded), so both parts still stream."""
        if len(self.shards) < 2:
            raise InputError(f"{self.shards[0].parent}: one shard cannot be split; give --eval-data")
        order = np.random.default_rng(seed).permutation(len(self.shards))
        k = min(max(1, int(round(eval_fraction * len(self.shards)))), len(self.shards) - 1)
        ev, tr = sorted(order[:k].tolist()), sorted(order[k:].tolist())

        def pick(ids):
            return ShardedDataset(
                [self.shards[i] for i in ids],
                [self.counts[i] for i in ids],  # noqa: E731
                self._model,
            )

        return pick(tr), pick(ev)

    def fingerprint(self, h: Any) -> None:
        for p in self.shards:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)


def load_shards(folder: Path, model: onnx.ModelProto) -> ShardedDataset:
    """Validate every shard from its headers (names, ranks, dims, dtypes, counts) and return a
    streaming data set; no shard's data is read here."""
    shards = sorted(folder.glob("*.npz"))
    if not shards:
        raise InputError(f"{folder}: the folder has no .npz shards")
    specs = _input_specs(model)
    counts, with_labels = [], None
    for p in shards:
        heads = _npz_headers(p)
        _check_sizes(p, heads)  # one shard is in memory at a time
        _check_names(p, heads, specs)
        n = {heads[k].shape[0] if heads[k].shape else -1 for k in heads}
        if len(n) != 1 or -1 in n:
            raise InputError(f"{p}: arrays have different sample counts")
        for name, (_, dims) in specs.items():
            shape, dt = heads[name].shape, heads[name].dtype
            if len(shape) != len(dims) or any(
                i > 0 and isinstance(d, int) and d > 0 and shape[i] != d for i, d in enumerate(dims)
            ):
                raise InputError(f"{p}: array '{name}' has shape {shape}, the model expects {dims}")
            if dt.kind not in "fiu":
                raise InputError(f"{p}: array '{name}' has dtype {dt}")
        if with_labels is None:
            with_labels = LABELS in heads
        elif with_labels != (LABELS in heads):
            raise InputError(f"{p}: some shards have labels and some do not")
        if LABELS in heads:
            label_dtype = heads[LABELS].dtype
            if label_dtype.kind not in "iu" or len(heads[LABELS].shape) != 1:
                raise InputError(f"{p}: 'labels' must be a 1-D integer array, got {label_dtype}")
            try:
                with np.load(p, allow_pickle=False) as z:
                    check_labels(p, z[LABELS], model)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise InputError(f"{p}: not a readable .npz file ({str(e)[:200]})") from None
        counts.append(n.pop())
    return ShardedDataset(shards, counts, model)


def load_data(spec: str | Path, model: onnx.ModelProto) -> Dataset | ShardedDataset:
    """A data set from an ``.npz`` file, a folder of ``.npz`` shards (read in name order and
    streamed, see :class:`ShardedDataset`), or a Python entry point ``module:function`` returning
    an iterable of batches (dicts of arrays named after the model inputs, optionally ``labels``;
    concatenated in memory)."""
    p = Path(spec)
    if p.is_dir():
        return load_shards(p, model)
    if not p.exists() and ":" in str(spec) and not str(spec).endswith(".npz"):
        return _from_entry_point(str(spec), model)
    return load_npz(p, model)
