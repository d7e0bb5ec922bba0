"""File-system safety in one place: where graphslim may write, output folders replaced whole or
not at all, atomic file writes, and scratch folders that do not outlive the run.

graphslim runs unattended inside build systems, on folders that hold people's models. What this
module promises (every writer, optimize, compile, compare, report and the cache, goes through it):

- graphslim replaces only a folder it wrote itself. Every output folder carries a marker,
  ``.graphslim.json``, with the kind of output (optimize, compile, compare, cache) and the sha256
  of every file in it. Any other non-empty folder, an output of another kind (a compare table
  over an optimize run), or a graphslim folder holding files the marker does not list is refused
  with one line unless ``force``. Never replaced, whatever ``force`` says: a symbolic link, the
  folder of an input or any parent of an input, the current folder and its parents, the home
  folder and ``/``. Folders written by graphslim before the marker existed are recognized by
  their file names and their report (see ``_LEGACY``).
- an output folder is built in a temporary sibling, then swapped in (one atomic exchange with
  ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames), so it is replaced
  whole or not at all.
- one run at a time per output folder: a run holds a lock beside the folder (``.NAME.lock``,
  removed at the end) from its checks to the swap, and a second run on the same folder fails at
  once (:class:`OutputBusy`) instead of racing it.
- Ctrl-C and SIGTERM arriving while temporaries are swapped or removed wait until that is done
  (:func:`signals_deferred`); temporaries a killed run left (SIGKILL) are removed by the next run
  on the same folder.
- folders and files are created with the user's umask (not mode 700 / 600).
- an output folder that cannot be written (read-only, under /proc, a full disk) is found when it
  is reserved, before any work: :class:`OutputDir` creates its temporary sibling and writes a probe.
- scratch folders under TMPDIR (:func:`scratch_dir`, :func:`make_scratch_dir`) are removed when
  done, on signals, and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from graphslim.core.errors import InputError
from graphslim.core.version import __version__

__all__ = [
    "KINDS",
    "MARKER",
    "FileWriter",
    "OutputBusy",
    "OutputDir",
    "atomic_write",
    "check_out_dir",
    "file_sha256",
    "make_scratch_dir",
    "private_tmpdir",
    "read_marker",
    "remove_scratch",
    "scratch_dir",
    "signals_deferred",
    "umask",
    "update_output_files",
    "verify_output_dir",
    "write_output_dir",
]

log = logging.getLogger(__name__)

MARKER = ".graphslim.json"
KINDS = ("optimize", "compile", "compare", "cache")
#: Folders written before the marker existed: (files that must be there, every name allowed).
_LEGACY: dict[str, tuple[str, frozenset[str]]] = {
    "optimize": (
        "report.json",
        frozenset(
            {
                "model.onnx",
                "model.onnx.data",
                "report.json",
                "report.md",
                "report.html",
                "layers.png",
                "accuracy.png",
                "latency.png",
                "compiled",
            }
        ),
    ),
    "compile": ("artifact.json", frozenset({"artifact.json", "model.so", "model.tar", "model.cu", "tuning"})),
    "compare": ("compare.md", frozenset({"compare.md", "compare.html", "compare.png"})),
}
_MAX_MARKER_BYTES = 16 * 2**20
_PROBE_BYTES = 64 * 1024

#: A file's bytes, or a function that writes the file (and any companions) into the folder it is given.
FileWriter = bytes | Callable[[Path], None]


class OutputBusy(InputError):
    """Another graphslim run is writing the same output folder."""


# --------------------------------------------------------------------------- small helpers


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        old = os.umask(0o022)
        os.umask(old)
    return old


_UMASK_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them as before.

    Python raises KeyboardInterrupt (or runs graphslim's SIGTERM handler) between any two
    bytecodes; inside a swap or a cleanup that would leave temporaries behind. Only the main
    thread runs Python signal handlers, so other threads need no deferral."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)  # the default action, now that the handler is back


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never a partial one. The file gets the umask's mode."""
    path = Path(path)
    with signals_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with signals_deferred():
            Path(tmp).unlink(missing_ok=True)
        raise


def _os_error(where: Path | str, e: OSError, what: str) -> InputError:
    return InputError(f"{where}: {what} ({e.strerror or type(e).__name__})")


# --------------------------------------------------------------------------- markers


def _walk_files(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative POSIX paths, sorted), the marker excepted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def _legacy_kind(folder: Path, names: set[str]) -> str | None:
    for kind, (required, allowed) in _LEGACY.items():
        if required not in names or not names <= allowed:
            continue
        if kind in ("optimize", "compile"):
            try:
                doc = json.loads((folder / required).read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict) or "schema_version" not in doc:
                continue
        return kind
    return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """What graphslim recorded about the output folder ``folder`` (``kind``, ``files``: relative
    path -> sha256, ``legacy``: True for folders from before the marker), or None when graphslim
    did not write it."""
    folder = Path(folder)
    m = folder / MARKER
    try:
        if m.is_file() and not m.is_symlink() and m.stat().st_size <= _MAX_MARKER_BYTES:
            doc = json.loads(m.read_text())
            if (
                isinstance(doc, dict)
                and doc.get("written_by") == "graphslim"
                and doc.get("kind") in KINDS
                and isinstance(doc.get("files"), dict)
            ):
                return {**doc, "legacy": False}
            return None
        names = {p.name for p in folder.iterdir()}
    except (OSError, ValueError, UnicodeError):
        return None
    kind = _legacy_kind(folder, names)
    if kind is None:
        return None
    return {"written_by": "graphslim", "kind": kind, "files": {n: None for n in _walk_files(folder)}, "legacy": True}


def _write_marker(folder: Path, kind: str) -> None:
    files = {rel: file_sha256(folder / rel) for rel in _walk_files(folder)}
    doc = {"written_by": "graphslim", "version": __version__, "kind": kind, "files": files}
    (folder / MARKER).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def verify_output_dir(folder: Path, kind: str) -> list[str]:
    """What is wrong with the graphslim output ``folder`` of ``kind``: files missing, changed
    (their sha256 differs from the marker's) or added since graphslim wrote it. Empty: intact."""
    marker = read_marker(folder)
    if marker is None or marker["legacy"]:
        return ["no checksums (written by an older graphslim, or not by graphslim)"]
    if marker["kind"] != kind:
        return [f"a {marker['kind']} output, not a {kind} output"]
    problems = []
    present = set(_walk_files(folder))
    for rel, digest in sorted(marker["files"].items()):
        if rel not in present:
            problems.append(f"{rel} is missing")
        else:
            try:
                if file_sha256(folder / rel) != digest:
                    problems.append(f"{rel} changed")
            except OSError as e:
                problems.append(f"{rel} unreadable ({e.strerror})")
    problems += [f"{rel} was added" for rel in sorted(present - set(marker["files"]))]
    return problems


# --------------------------------------------------------------------------- checks


def _target(out: str | os.PathLike[str]) -> Path:
    """The absolute path of ``out`` with its folders resolved and its last part not, so that a
    symbolic link given as the output is seen as one."""
    a = Path(out).absolute()
    if a.name in ("", ".", ".."):
        return a.resolve()
    return a.parent.resolve() / a.name


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(
    out: str | os.PathLike[str], kind: str, *, inputs: Iterable[str | os.PathLike[str]] = (), force: bool = False
) -> Path:
    """Refuse an output folder graphslim must not replace (see the module doc); return its path.

    ``inputs`` are the files and folders the run reads (model, external data, data sets, the
    cache): the output may be inside their folders, never one of them or a parent of one."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    p = _target(out)
    if p.is_symlink():
        raise InputError(f"{out}: is a symbolic link; graphslim does not replace links (give another folder)")
    if p.exists() and not p.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    _refuse_protected(out, p, inputs)
    if p.is_dir():
        _refuse_foreign(out, p, kind, force)
    return p


def _refuse_protected(out: str | os.PathLike[str], p: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output folder that is (or holds) the root, home or current folder, or an input."""
    for name, where in (
        ("the root folder", lambda: Path("/")),
        ("your home folder", Path.home),
        ("the current folder", Path.cwd),
    ):
        try:
            protected = where().resolve()
        except (OSError, RuntimeError):  # no home folder, or a current folder that was deleted
            continue
        if _is_within(protected, p):
            what = name if p == protected else f"a parent of {name}"
            raise InputError(f"{out}: is {what}; graphslim never replaces it (choose a new folder)")
    for item in inputs:
        if item is None:
            continue
        try:
            r = Path(item).absolute().resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if _is_within(r, p):
            how = "is the input" if r == p else "contains the input"
            raise InputError(
                f"{out}: the output folder {how} {item}; graphslim never replaces an input or its folder "
                "(choose another folder)"
            )


def _refuse_foreign(out: str | os.PathLike[str], p: Path, kind: str, force: bool) -> None:
    """Refuse an existing, non-empty folder graphslim did not write as a ``kind`` output (or that
    holds files it did not write), unless ``force``."""
    try:
        names = {e.name for e in p.iterdir()}
    except OSError as e:
        raise _os_error(out, e, "cannot read the folder") from None
    if not names:
        return
    marker = read_marker(p)
    if force:
        return
    if marker is None:
        raise InputError(
            f"{out}: exists and was not written by graphslim (no {MARKER}); refusing to replace it: "
            "choose a new folder, or pass --force to replace it"
        )
    if marker["kind"] != kind:
        raise InputError(
            f"{out}: holds a graphslim {marker['kind']} output; refusing to replace it with a {kind} output "
            "(choose another folder, or pass --force)"
        )
    mine = {rel.split("/", 1)[0] for rel in marker["files"]} | {MARKER}
    extra = sorted(names - mine)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise InputError(
            f"{out}: holds files graphslim did not write ({shown}); refusing to replace it (move them, or pass --force)"
        )


# --------------------------------------------------------------------------- output folders


def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2). False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(b))


_OPEN: dict[Path, OutputDir] = {}  # reservations this process holds, by folder


class OutputDir:
    """One run's output folder, reserved from the checks before the work to the final swap.

    ``with OutputDir(out, "optimize", inputs=[...], force=False) as dest: ...; dest.write(files)``.
    Entering checks the folder (:func:`check_out_dir`), creates missing parents, takes the lock
    beside it (a second run fails with :class:`OutputBusy`), removes temporaries that killed runs
    left, and creates the temporary sibling with a probe write, so an unwritable folder is found
    now. :meth:`write` fills the sibling and swaps it in; leaving removes everything temporary
    (and the parents it created, when nothing was written). While a reservation is open,
    :func:`write_output_dir` calls for the same folder in this process write through it.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        kind: str,
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
        force: bool = False,
    ):
        self.requested = out
        self.kind = kind
        self.inputs = [i for i in inputs if i is not None]
        self.force = force
        self.path = _target(out)
        self.written = False
        self._tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._created: list[Path] = []

    # ---- entering and leaving
    def __enter__(self) -> OutputDir:
        try:
            self.path = check_out_dir(self.requested, self.kind, inputs=self.inputs, force=self.force)
            with signals_deferred():
                self._make_parents()
                self._lock()
                _OPEN[self.path] = self
            self._remove_stale()
            self._new_tmp()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        with signals_deferred():
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            if _OPEN.get(self.path) is self:
                del _OPEN[self.path]
            self._unlock()
            if not self.written:
                for d in reversed(self._created):
                    with contextlib.suppress(OSError):
                        d.rmdir()
            self._created = []

    def _make_parents(self) -> None:
        missing = []
        d = self.path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)  # mode 0o777 less the umask
            except FileExistsError:
                continue
            except OSError as e:
                raise _os_error(self.requested, e, f"cannot create the folder {d}") from None
            self._created.append(d)

    def _lock(self) -> None:
        self._lock_fd, self._lock_path = _lock_beside(self.path, self.requested)

    def _unlock(self) -> None:
        if self._lock_fd is not None and self._lock_path is not None:
            _unlock(self._lock_fd, self._lock_path)
        self._lock_fd = self._lock_path = None

    def _stale_pattern(self) -> re.Pattern[str]:
        # ".NAME.tmp-PID-HEX" (this version) and ".NAME.tmp-XXXXXXXX" (mkdtemp, before it).
        return re.compile(rf"^\.{re.escape(self.path.name)}\.(?:tmp|old)-(?:(\d+)-[0-9a-f]+|[a-z0-9_]{{8}})$")

    def _remove_stale(self) -> None:
        """Temporaries of this folder that runs killed before their cleanup left behind. Every
        writer of the folder holds the lock while its temporaries exist, so, with the lock held,
        those of a process that is gone (or of this one) are leftovers."""
        pattern = self._stale_pattern()
        try:
            entries = list(self.path.parent.iterdir())
        except OSError:
            return
        for e in entries:
            m = pattern.match(e.name)
            if not m or e.is_symlink() or not e.is_dir():
                continue
            pid = int(m.group(1)) if m.group(1) else None
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            with signals_deferred():
                shutil.rmtree(e, ignore_errors=True)
            log.info("removed %s, left behind by an interrupted run", e)

    def _new_tmp(self) -> None:
        with signals_deferred():
            tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp)  # mode 0o777 less the umask: the folder the user gets
            except OSError as e:
                raise _os_error(self.requested, e, "cannot write there") from None
            self._tmp = tmp
        probe = tmp / ".probe"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise _os_error(self.requested, e, "cannot write there") from None

    # ---- writing
    def write(self, files: dict[str, FileWriter]) -> Path:
        """Write ``files`` into the temporary sibling, add the marker, and swap it into place.
        On failure the sibling is emptied, so a later ``write`` can try again."""
        if self._tmp is None:
            raise RuntimeError("OutputDir.write outside its with-block, or twice")
        tmp = self._tmp
        try:
            for name, data in files.items():
                if callable(data):
                    data(tmp)
                else:
                    (tmp / name).write_bytes(data)
            _write_marker(tmp, self.kind)
        except BaseException:
            with signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
                self._tmp = None
            self._new_tmp()
            raise
        with signals_deferred():
            # The folder may have changed while the run worked (a user put files there).
            check_out_dir(self.requested, self.kind, inputs=self.inputs, force=self.force)
            self._swap(tmp)
            self._tmp = None
            self.written = True
        return self.path

    def _swap(self, tmp: Path) -> None:
        p = self.path
        if not os.path.lexists(p):
            try:
                os.rename(tmp, p)
            except OSError as e:
                raise _os_error(self.requested, e, "cannot put the output in place") from None
            return
        if _exchange(tmp, p):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
            return
        old = p.parent / f".{p.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(p, old)
        try:
            os.rename(tmp, p)
        except BaseException:
            os.rename(old, p)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)


def _lock_beside(path: Path, shown: str | os.PathLike[str]) -> tuple[int, Path]:
    """Take the lock ``.NAME.lock`` beside ``path`` (created if needed); :class:`OutputBusy` if
    another run holds it."""
    lock = path.parent / f".{path.name}.lock"
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise _os_error(shown, e, "cannot write there") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusy(
                f"{shown}: another graphslim run{f' (pid {holder})' if holder.isdigit() else ''} "
                "is writing this folder; try again when it has finished"
            ) from None
        except ImportError:  # no flock (not POSIX): no lock
            pass
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the run that held it removed the file meanwhile: take the new one
            with contextlib.suppress(OSError):  # the pid is for the message only (a full disk refuses it)
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd, lock
        os.close(fd)
    raise OutputBusy(f"{shown}: the lock beside the folder keeps changing; try again")


def _unlock(fd: int, lock: Path) -> None:
    """Remove the lock file (if it is still ours) and release it."""
    with contextlib.suppress(OSError):
        if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock)
    os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_output_dir(
    out: str | os.PathLike[str],
    files: dict[str, FileWriter],
    *,
    kind: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
) -> Path:
    """Write ``files`` as the output folder ``out`` of ``kind``: everything appears at once, or
    nothing changes (see :class:`OutputDir`; a reservation this process holds on ``out`` is used)."""
    held = _OPEN.get(_target(out))
    if held is not None and held.kind == kind:
        return held.write(files)
    with OutputDir(out, kind, inputs=inputs, force=force) as dest:
        return dest.write(files)


def update_output_files(folder: str | os.PathLike[str], kind: str, files: dict[str, bytes]) -> None:
    """Replace some files of a graphslim output folder in place (each atomically) and update its
    marker: what ``graphslim report`` does. Refuses a folder graphslim did not write."""
    p = Path(folder)
    marker = read_marker(p)
    if marker is None or marker["kind"] != kind:
        raise InputError(f"{folder}: not a graphslim {kind} output folder (no {MARKER}); nothing written")
    with signals_deferred():
        fd, lock = _lock_beside(_target(p), folder)
    try:
        for name, data in files.items():
            atomic_write(p / name, data)
        doc = {
            "written_by": "graphslim",
            "version": __version__,
            "kind": kind,
            "files": {rel: file_sha256(p / rel) for rel in _walk_files(p)},
        }
        atomic_write(p / MARKER, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    finally:
        with signals_deferred():
            _unlock(fd, lock)


# --------------------------------------------------------------------------- scratch folders

_SCRATCH: set[Path] = set()


def make_scratch_dir(purpose: str) -> Path:
    """A private folder under TMPDIR (``graphslim-PURPOSE-*``), removed by :func:`remove_scratch`
    or at exit at the latest."""
    with signals_deferred():
        path = Path(tempfile.mkdtemp(prefix=f"graphslim-{purpose}-"))
        _SCRATCH.add(path)
    return path


def remove_scratch(path: Path | None = None) -> None:
    """Remove the scratch folder ``path``, or every one this process still has."""
    with signals_deferred():
        for p in [path] if path is not None else sorted(_SCRATCH):
            shutil.rmtree(p, ignore_errors=True)
            _SCRATCH.discard(p)


@contextlib.contextmanager
def scratch_dir(purpose: str) -> Iterator[Path]:
    """``with scratch_dir("tuning") as d:`` a scratch folder removed when the block ends (also on
    Ctrl-C or SIGTERM)."""
    path = make_scratch_dir(purpose)
    try:
        yield path
    finally:
        remove_scratch(path)


@contextlib.contextmanager
def private_tmpdir() -> Iterator[Path]:
    """Point TMPDIR (``tempfile`` and child processes) into one scratch folder for the block, so
    that what libraries create there (ONNX Runtime's quantizer, TVM's tuning workers) is removed
    with it, also when a signal cuts their own cleanup short."""
    path = make_scratch_dir("run")
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        with signals_deferred():
            tempfile.tempdir = old_tempdir
            if old_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old_env
            remove_scratch(path)


atexit.register(remove_scratch)
