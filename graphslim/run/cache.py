"""The run cache: a folder of earlier outputs keyed by everything a result depends on.

``cache_key`` hashes the model and its external data, the normalized pipeline, the data sets,
the seed, the target and the versions of the libraries that compute the result; a run whose key
is already in the cache folder copies the stored outputs instead of running. Entries are written
through :func:`graphslim.core.fs.write_output_dir` (whole or not at all) with a marker that holds
the sha256 of every file; an entry is checked against it when read, and again as it is copied, so
a truncated, bit-flipped or edited entry is never served: it is reported (a warning) and the run
recomputes and stores it anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from graphslim.core.data import Dataset
from graphslim.core.errors import GraphslimError
from graphslim.core.fs import MARKER, FileWriter, OutputDir, file_sha256, read_marker, verify_output_dir
from graphslim.core.runtime import require_onnxruntime
from graphslim.core.version import __version__

__all__ = ["CacheDamaged", "CacheEntry", "cache_key", "copy_entry", "read_entry", "versions"]

log = logging.getLogger(__name__)


class CacheDamaged(GraphslimError):
    """A cache entry's files do not match the checksums stored with it."""


def versions() -> dict[str, str]:
    """The versions of graphslim and of the libraries whose results a run depends on."""
    import numpy
    import onnx_graphsurgeon

    onnxruntime = require_onnxruntime()  # also sets its native log level (graphslim.core.runtime)

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
    """The cached outputs in ``entry`` if they are intact, or None: no entry, or a damaged one
    (files missing, changed or added since it was stored; that is logged as a warning)."""
    if not entry.is_dir():
        return None
    problems = verify_output_dir(entry, "cache")
    if not problems:
        try:
            report = json.loads((entry / "report.json").read_text())
        except (OSError, ValueError) as e:
            problems = [f"report.json unreadable ({e})"]
        else:
            if isinstance(report, dict):
                return CacheEntry(entry, report)
            problems = ["report.json is not a report"]
    shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
    log.warning("cache entry %s is damaged (%s); recomputing it", entry, shown)
    return None


def copy_entry(cached: CacheEntry, dest: OutputDir) -> None:
    """The cached folder (model, weights, compiled artifact, plots) as the output folder, with
    its report saying it came from the cache. Each file is checked against the entry's checksums
    as it is copied: :class:`CacheDamaged` if one changed since :func:`read_entry`."""
    from graphslim.report import render_files

    expected = (read_marker(cached.folder) or {}).get("files", {})

    def copy(folder: Path) -> None:
        for item in sorted(cached.folder.iterdir()):
            if item.name == MARKER or item.name.startswith("report."):
                continue
            if item.is_dir():
                shutil.copytree(item, folder / item.name, symlinks=True)
            else:
                shutil.copy2(item, folder / item.name)
        for rel, digest in expected.items():
            if rel.startswith("report."):
                continue
            target = folder / rel
            if not target.is_file() or file_sha256(target) != digest:
                raise CacheDamaged(f"cache entry {cached.folder} is damaged ({rel} changed while it was copied)")

    files: dict[str, FileWriter] = {"model.onnx": copy}
    files.update({k: v for k, v in render_files(cached.report).items() if k.startswith("report.")})
    dest.write(files)
