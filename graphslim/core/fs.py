"""File-system safety in one place: atomic file writes, output folders replaced whole or not at
all, and the checks on where graphslim may write.

Every file graphslim writes for the user goes through this module: models (:func:`atomic_write`),
output folders (:func:`write_output_dir`: a temporary sibling renamed into place, so a folder is
replaced whole or not at all, also on Ctrl-C or SIGTERM), and the cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from graphslim.core.errors import InputError

__all__ = ["atomic_write", "check_out_dir", "write_output_dir"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_out_dir(src: Path, out: Path) -> None:
    """Refuse an output folder that is a file or that contains the input model."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    try:
        src_r, out_r = src.resolve(), out.resolve()
    except OSError as e:
        raise InputError(f"{out}: {e.strerror}") from None
    if out_r == src_r.parent or out_r in src_r.parents:
        raise InputError(f"{out}: the output folder contains the input model; choose another folder")


def write_output_dir(out_dir: Path, files: dict[str, bytes | Callable[[Path], None]]) -> None:
    """Write ``files`` into ``out_dir``: everything appears at once, or nothing changes.

    A value is the file's bytes, or a function that writes the file (and any companion files,
    such as external weights) into the folder it is given.

    The files go to a temporary sibling folder first, which then replaces ``out_dir`` by rename.
    """
    out_dir = out_dir.absolute()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{parent}: cannot create output folder ({e.strerror})") from None
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.tmp-"))
    old: Path | None = None
    try:
        for name, data in files.items():
            if callable(data):
                data(tmp)
            else:
                (tmp / name).write_bytes(data)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.old-"))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.rename(old, out_dir)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
