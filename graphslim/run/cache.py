"""The run cache: a folder of earlier outputs keyed by everything a result depends on.

``cache_key`` hashes the model and its external data, the normalized pipeline, the data sets,
the seed, the target and the versions of the libraries that compute the result; a run whose key
is already in the cache folder copies the stored outputs instead of running. Entries are written
through :func:`graphslim.core.fs.write_output_dir` (whole or not at all).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from graphslim.core.data import Dataset
from graphslim.core.fs import write_output_dir
from graphslim.core.version import __version__

__all__ = ["CacheEntry", "cache_key", "copy_entry", "read_entry", "versions"]


def versions() -> dict[str, str]:
    """The versions of graphslim and of the libraries whose results a run depends on."""
    import numpy
    import onnx_graphsurgeon
    import onnxruntime

    return {
        "graphslim": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
        "numpy": numpy.__version__,
    }


def cache_key(
    model_sha256: str,
    pipeline: str,
    data: dict[str, Dataset | None],
    *,
    seed: int,
    target: str | None,
    verify: bool,
    extra: dict[str, Any] | None = None,
) -> str:
    """What a build system can key on: same key, same outputs (model bytes and report numbers)."""
    h = hashlib.sha256()
    meta = {
        "model": model_sha256,
        "pipeline": pipeline,
        "seed": seed,
        "target": target,
        "verify": verify,
        "versions": versions(),
        **(extra or {}),
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for role in sorted(data):
        ds = data[role]
        h.update(f"|{role}:".encode())
        if ds is not None:
            ds.fingerprint(h)
    return h.hexdigest()[:32]


@dataclass
class CacheEntry:
    folder: Path
    report: dict[str, Any]


def read_entry(entry: Path) -> CacheEntry | None:
    """The cached outputs in ``entry``, or None when there are none (or they cannot be read)."""
    try:
        if not (entry / "model.onnx").is_file():
            return None
        return CacheEntry(entry, json.loads((entry / "report.json").read_text()))
    except (OSError, ValueError):
        return None


def copy_entry(cached: CacheEntry, out_dir: Path) -> None:
    """The cached folder (model, weights, compiled artifact, plots) as OUT_DIR, with its report
    saying it came from the cache."""
    from graphslim.report import render_files

    def copy(folder: Path) -> None:
        for item in cached.folder.iterdir():
            if item.is_dir():
                shutil.copytree(item, folder / item.name)
            elif not item.name.startswith("report."):
                shutil.copy2(item, folder / item.name)

    files: dict[str, bytes | Callable[[Path], None]] = {"model.onnx": copy}
    files.update({k: v for k, v in render_files(cached.report).items() if k.startswith("report.")})
    write_output_dir(out_dir, files)
