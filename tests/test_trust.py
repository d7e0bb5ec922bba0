"""Issue 18: graphslim never deletes a user's files, never runs foreign code, never serves a
corrupt cache, and answers every bad input with one clear line and exit 2.

Every test runs inside a canary tree (``canary`` in tests/conftest.py): the user's files around
the run, TMPDIR and the current folder; nothing outside the output folder and the cache may be
created, changed or deleted, and TMPDIR must be empty again. Tests that need a big allocation run
graphslim in a child process under ``RLIMIT_AS`` (a machine with little memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE

import graphslim
from graphslim.cli import main
from graphslim.core.errors import InputError
from graphslim.core.fs import MARKER, OutputDir, verify_output_dir

CORPUS = Path(__file__).parent / "corpus"
MODEL, DATA = EXAMPLE / "model.onnx", EXAMPLE / "data.npz"
FAST = ["--no-latency", "-q"]
LIMIT_MB = 1536  # RLIMIT_AS of the children that meet a bomb: graphslim needs about 900 MB of address space


def cli(*args: str, limit_mb: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """graphslim in a child process (its own exit code, signals, memory limit)."""
    environ = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    return subprocess.run(
        [sys.executable, "-m", "graphslim.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
        preexec_fn=limit if limit_mb else None,
    )


def refused(code: int, err: str, *needles: str) -> None:
    """Exit 2 with one line on stderr, no traceback, naming what is wrong."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("graphslim: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """graphslim in this process (fast): exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def whole(out: Path) -> bool:
    """An output folder graphslim wrote completely: every file its marker lists, unchanged."""
    return out.is_dir() and verify_output_dir(out, "optimize") == []


# --------------------------------------------------------------------------- foreign code

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen(getenv("EVIL_MARK"), "w");
    if (f) { fputs("foreign code ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """The example compiled for this host (once per module)."""
    pytest.importorskip("tvm")
    from graphslim.backend import compile_model

    folder = tmp_path_factory.mktemp("compiled") / "art"
    compile_model(onnx.load(str(MODEL)), "x86", folder)
    return folder


def _artifact(canary, compiled: Path, name: str = "art") -> Path:
    art = canary.root / name
    shutil.copytree(compiled, art)
    canary.rebase()
    return art


def test_artifact_library_outside_its_folder_or_with_another_hash_is_never_loaded(canary, compiled):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to build the foreign library")
    (canary.root / "elsewhere").mkdir()
    (canary.root / "elsewhere" / "evil.c").write_text(EVIL_C)
    evil = canary.root / "elsewhere" / "model.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(evil), str(canary.root / "elsewhere" / "evil.c")], check=True)
    mark = canary.root / "foreign-code-ran"
    env = {"EVIL_MARK": str(mark)}
    meta = json.loads((compiled / "artifact.json").read_text())
    cases = {
        "relative path out of the folder": {"library": "../elsewhere/model.so"},
        "absolute path": {"library": str(evil)},
        "hash recorded for another library": {"library_sha256": hashlib.sha256(evil.read_bytes()).hexdigest()},
        "no hash (an older artifact)": {"library_sha256": None},
    }
    for i, (what, change) in enumerate(cases.items()):
        art = _artifact(canary, compiled, f"art{i}")
        (art / "artifact.json").write_text(json.dumps({**meta, **change}))
        canary.rebase()
        for argv in (["run", str(art), "--data", str(DATA)], ["bench", str(art), "--repeat", "1", "--warmup", "0"]):
            r = cli(*argv, env=env)
            refused(r.returncode, r.stderr, str(art))
            assert not mark.exists(), f"{what}: the foreign library ran"
    # The library in the folder replaced by another one (artifact.json untouched).
    art = _artifact(canary, compiled, "swapped")
    shutil.copy(evil, art / "model.so")
    canary.rebase()
    r = cli("run", str(art), "--data", str(DATA), env=env)
    refused(r.returncode, r.stderr, "does not match the sha256")
    assert not mark.exists()
    # The artifact as compiled runs.
    art = _artifact(canary, compiled, "intact")
    r = cli("run", str(art), "--data", str(DATA), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.95 and not mark.exists()


def test_truncated_compiled_library_is_an_input_error_not_a_crash(canary, compiled):
    art = _artifact(canary, compiled)
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3])  # loading this died with SIGBUS
    canary.rebase()
    r = cli("run", str(art), "--data", str(DATA))
    refused(r.returncode, r.stderr, "truncated or changed")


def test_changed_or_truncated_weights_are_refused(canary, compiled):
    """The weights beside the library (params.bin) are checked against their recorded sha256
    before anything runs: a flipped byte or a cut file is one line, exit 2."""
    assert json.loads((compiled / "artifact.json").read_text())["params"]["file"] == "params.bin"
    flipped = _artifact(canary, compiled, "flipped")
    data = bytearray((flipped / "params.bin").read_bytes())
    data[len(data) // 2] ^= 0x40
    (flipped / "params.bin").write_bytes(bytes(data))
    cut = _artifact(canary, compiled, "cut")
    (cut / "params.bin").write_bytes(data[: len(data) // 2])
    canary.rebase()
    for art, message in ((flipped, "does not match the sha256"), (cut, "truncated")):
        for argv in (["run", str(art), "--data", str(DATA)], ["bench", str(art), "--repeat", "1", "--warmup", "0"]):
            r = cli(*argv)
            refused(r.returncode, r.stderr, message)


_PARAMS = {"file": "params.bin", "bytes": 128, "sha256": "0" * 64, "tensors": []}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"target": "pdp11"}, "target"),
        ({"batch": "32"}, "batch"),
        ({"batch": 0}, "batch"),
        ({"batch": 10**30}, "batch"),
        ({"inputs": "x"}, "inputs"),
        ({"inputs": [{"name": "input", "shape": [1, -3], "dtype": "float32"}]}, "inputs"),
        ({"inputs": [{"name": "input", "shape": [2**40, 2**40], "dtype": "float32"}]}, "inputs"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "object"}]}, "inputs"),
        ({"inputs": [{"shape": [1, 1, 8, 8], "dtype": "float32"}]}, "inputs"),
        ({"outputs": [1, 2]}, "outputs"),
        ({"library": ""}, "library"),
        ({"library": "sub/model.so"}, "library"),
        ({"library": ".."}, "library"),
        ({"library_sha256": "12"}, "library_sha256"),
        ({"tvm_target": "llvm"}, "tvm_target"),
        ({"params": {"file": "../w.bin"}}, "params"),
        ({"params": _PARAMS | {"sha256": "ab"}}, "params"),
        ({"params": _PARAMS | {"tensors": [{"dtype": "object", "shape": [4], "offset": 0}]}}, "params"),
        ({"params": _PARAMS | {"tensors": [{"dtype": "float32", "shape": [4], "offset": 3}]}}, "params"),
        ({"params": _PARAMS | {"tensors": [{"dtype": "float32", "shape": [64], "offset": 0}]}}, "params"),
        ({"params": _PARAMS | {"tensors": [{"dtype": "float32", "shape": [-4], "offset": 0}]}}, "params"),
    ],
)
def test_bad_artifact_json_field_is_named(canary, capsys, change, field):
    """No TVM needed: artifact.json is checked before anything is loaded."""
    art = canary.root / "art"
    art.mkdir()
    meta = {
        "schema_version": 1,
        "target": "x86",
        "tvm_target": {"kind": "llvm", "mcpu": "haswell"},
        "batch": 1,
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        "outputs": ["logits"],
        "library": "model.so",
        "library_sha256": "0" * 64,
    }
    (art / "artifact.json").write_text(json.dumps({**meta, **change}))
    (art / "model.so").write_bytes(b"\x7fELF not really")
    canary.rebase()
    for argv in (["run", str(art), "--data", str(DATA)], ["bench", str(art)]):
        code, _, err = run(capsys, *argv)
        refused(code, err, f"bad field '{field}'")
    (art / "artifact.json").write_text("[1, 2")
    canary.rebase()
    code, _, err = run(capsys, "run", str(art), "--data", str(DATA))
    refused(code, err, "not a graphslim artifact")


# --------------------------------------------------------------------------- -o never deletes the user's files


def _external_model(canary) -> Path:
    """The example with its weights in work/m/weights/w.bin (external data)."""
    m = onnx.load(str(MODEL))
    folder = canary.work / "m"
    (folder / "weights").mkdir(parents=True)
    onnx.save_model(
        m, str(folder / "model.onnx"), save_as_external_data=True, location="weights/w.bin", size_threshold=0
    )
    canary.rebase()
    return folder / "model.onnx"


def test_output_is_never_an_input_or_a_folder_holding_one(canary, capsys):
    model = _external_model(canary)
    shards = canary.work / "shards"
    shards.mkdir()
    with np.load(DATA) as z:
        x, y = z["input"], z["labels"]
    np.savez(shards / "a.npz", input=x[:200], labels=y[:200])
    np.savez(shards / "b.npz", input=x[200:], labels=y[200:])
    canary.rebase()
    for force in ([], ["--force"]):
        for out in (model.parent / "weights", model.parent):
            code, _, err = run(capsys, "optimize", str(model), "-o", str(out), *FAST, *force)
            refused(code, err, "contains the input")
        for out in (canary.work, canary.root):  # parents of the input (and of the current folder)
            code, _, err = run(capsys, "optimize", str(model), "-o", str(out), *FAST, *force)
            refused(code, err)
        code, _, err = run(capsys, "optimize", str(MODEL), "--data", str(shards), "-o", str(shards), *FAST, *force)
        refused(code, err, "is the input")
        code, _, err = run(capsys, "compile", str(model), "--target", "x86", "-o", str(model.parent), "-q", *force)
        refused(code, err, "contains the input")
    # "-o ." where the current folder holds no input: still the user's folder.
    os.chdir(canary.root / "docs")
    for force in ([], ["--force"]):
        code, _, err = run(capsys, "optimize", str(MODEL), "-o", ".", *FAST, *force)
        refused(code, err, "the current folder")
        code, _, err = run(capsys, "optimize", str(MODEL), "-o", "..", *FAST, *force)
        refused(code, err, "a parent of the current folder")
    assert model.is_file() and (model.parent / "weights" / "w.bin").is_file()


def test_only_folders_graphslim_wrote_are_replaced(canary, capsys):
    user = canary.work / "sub"  # the canary's folder of the user's files
    for argv in (
        ["optimize", str(MODEL), "-o", str(user), *FAST],
        ["compile", str(MODEL), "--target", "x86", "-o", str(user), "-q"],
    ):
        code, _, err = run(capsys, *argv)
        refused(code, err, "was not written by graphslim", "--force")
    run_a, run_b, table = canary.root / "runs" / "a", canary.root / "runs" / "b", canary.root / "runs" / "table"
    canary.allow(canary.root / "runs")
    assert run(capsys, "optimize", str(MODEL), "-o", str(run_a), *FAST)[0] == 0
    assert run(capsys, "optimize", str(MODEL), "-o", str(run_b), *FAST, "--passes", "fold-batchnorm")[0] == 0
    before = {p.name: p.read_bytes() for p in run_a.iterdir()}
    code, _, err = run(capsys, "compare", str(run_b), "-o", str(run_a))  # an earlier run is not a table
    refused(code, err, "holds a graphslim optimize output")
    code, _, err = run(capsys, "compare", str(run_a), str(run_b), "-o", str(run_a))
    refused(code, err, "is the input")
    code, _, err = run(capsys, "compile", str(MODEL), "--target", "x86", "-o", str(run_a), "-q")
    refused(code, err, "holds a graphslim optimize output")
    assert {p.name: p.read_bytes() for p in run_a.iterdir()} == before
    assert run(capsys, "compare", str(run_a), str(run_b), "-o", str(table))[0] == 0
    assert run(capsys, "compare", str(run_a), "-o", str(table))[0] == 0  # its own kind: replaced
    assert json.loads((table / MARKER).read_text())["kind"] == "compare"
    # A graphslim folder the user added a file to.
    (run_b / "my-notes.txt").write_text("mine")
    code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(run_b), *FAST)
    refused(code, err, "holds files graphslim did not write (my-notes.txt)")
    assert (run_b / "my-notes.txt").read_text() == "mine"
    assert run(capsys, "optimize", str(MODEL), "-o", str(run_b), *FAST, "--force")[0] == 0
    assert not (run_b / "my-notes.txt").exists() and whole(run_b)
    # A folder an older graphslim wrote (no marker; its files and report) is still graphslim's.
    (run_a / MARKER).unlink()
    assert run(capsys, "optimize", str(MODEL), "-o", str(run_a), *FAST, "--passes", "fold-batchnorm")[0] == 0
    assert whole(run_a)
    # An empty folder holds nothing to lose.
    (canary.root / "runs" / "empty").mkdir()
    assert run(capsys, "optimize", str(MODEL), "-o", str(canary.root / "runs" / "empty"), *FAST)[0] == 0


def test_a_symbolic_link_given_as_output_is_not_replaced(canary, capsys):
    for link in (canary.work / "docs-link", canary.work / "plan-link"):
        for force in ([], ["--force"]):
            code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(link), *FAST, *force)
            assert code == 2 and "graphslim: error:" in err
            assert link.is_symlink()
    dangling = canary.work / "dangling"
    dangling.symlink_to(canary.root / "nowhere")
    canary.rebase()
    code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(dangling), *FAST, "--force")
    refused(code, err, "symbolic link")
    assert dangling.is_symlink() and not (canary.root / "nowhere").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_folders_and_files_follow_the_umask(canary, capsys, mask):
    out, cmp, cache = canary.root / "out", canary.root / "cmp", canary.root / "cache"
    canary.allow(out, cmp, cache)
    old = os.umask(mask)
    try:
        assert (
            run(capsys, "optimize", str(MODEL), "-o", str(out / "deep" / "run"), *FAST, "--cache-dir", str(cache))[0]
            == 0
        )
        assert run(capsys, "compare", str(out / "deep" / "run"), "-o", str(cmp))[0] == 0
        assert run(capsys, "report", str(out / "deep" / "run"))[0] == 0
    finally:
        os.umask(old)
    folders = [out, out / "deep", out / "deep" / "run", cmp, cache, *cache.iterdir()]
    files = [p for f in (out / "deep" / "run", cmp, *cache.iterdir()) for p in f.iterdir() if p.is_file()]
    assert {oct(f.stat().st_mode & 0o777) for f in folders} == {oct(0o777 & ~mask)}
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}


def _no_work_before_the_output_is_checked(monkeypatch) -> None:
    def no_work(*a, **k):
        raise AssertionError("the run started before its output folder was checked")

    monkeypatch.setattr(sys.modules["graphslim.run.optimize"], "load_model", no_work)


@contextlib.contextmanager
def _mounted(canary, name: str, options: str):
    """A small tmpfs at canary.root / name (root only; skips the test where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    point = canary.root / name
    point.mkdir()
    canary.rebase()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("mount is not permitted here")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], check=True)  # busy: detach it all the same
            raise AssertionError(f"{point} was still in use after the run (an open file left behind?)")


def test_unwritable_output_is_found_before_any_work(canary, capsys, monkeypatch):
    _no_work_before_the_output_is_checked(monkeypatch)
    code, _, err = run(capsys, "optimize", str(MODEL), "-o", "/proc/graphslim-out", *FAST)
    refused(code, err, "/proc/graphslim-out")
    code, _, err = run(capsys, "compare", str(MODEL), "-o", "/proc/graphslim-cmp")
    refused(code, err, "/proc/graphslim-cmp")
    if os.geteuid() != 0:  # permissions bind everyone but root
        ro = canary.root / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        canary.rebase()
        try:
            code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(ro / "out"), *FAST)
            refused(code, err, "cannot")
        finally:
            ro.chmod(0o755)
            canary.rebase()
        return
    with _mounted(canary, "ro", "ro,size=1m") as ro:
        code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(ro / "out"), *FAST)
        refused(code, err, "Read-only file system")
        code, _, err = run(capsys, "compile", str(MODEL), "--target", "x86", "-o", str(ro / "out"), "-q")
        refused(code, err, "Read-only file system")


def test_full_disk_is_found_before_any_work(canary, capsys, monkeypatch):
    _no_work_before_the_output_is_checked(monkeypatch)
    with _mounted(canary, "full", "size=256k") as full:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(full / "out"), *FAST)
        refused(code, err, "No space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


# --------------------------------------------------------------------------- temporaries and races


_FS_CALLS = [
    (os, "rename"),
    (os, "replace"),
    (os, "mkdir"),
    (os, "rmdir"),
    (os, "unlink"),
    (os, "open"),
    (shutil, "rmtree"),
    (shutil, "copytree"),
]


def _interrupt_at(monkeypatch, k: int | None, sig: int, after: bool) -> list[str]:
    """Count the file-system calls of a run; with ``k``, send ``sig`` to this process just before
    (or just after) call number ``k``."""
    import graphslim.core.fs as fs

    calls: list[str] = []
    for mod, name in _FS_CALLS:
        real = getattr(mod, name)

        def wrapper(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            hit = k is not None and len(calls) == k + 1
            if hit and not after:
                os.kill(os.getpid(), sig)
            result = _real(*a, **kw)
            if hit and after:
                os.kill(os.getpid(), sig)
            return result

        monkeypatch.setattr(mod, name, wrapper)
    real_exchange = fs._exchange

    def exchange(a, b):
        calls.append("exchange")
        hit = k is not None and len(calls) == k + 1
        if hit and not after:
            os.kill(os.getpid(), sig)
        done = real_exchange(a, b)
        if hit and after:
            os.kill(os.getpid(), sig)
        return done

    monkeypatch.setattr(fs, "_exchange", exchange)
    return calls


def test_ctrl_c_or_sigterm_at_any_file_operation_leaves_old_or_new_output_and_no_temporaries(
    canary, capsys, monkeypatch
):
    """Every file-system call of a run (output folder, lock, scratch folders under TMPDIR), with
    SIGINT or SIGTERM arriving just before or just after it: the output is the previous run or
    the new one, whole, and nothing temporary is left beside it or in TMPDIR."""
    out = canary.root / "out"
    canary.allow(out)
    argv = [
        "optimize",
        str(MODEL),
        "-o",
        str(out),
        "--data",
        str(DATA),
        "--passes",
        "fold-batchnorm,quantize-int8{sensitivity=false,calibration_samples=16}",
        *FAST,
    ]
    assert run(capsys, "optimize", str(MODEL), "-o", str(out), *FAST, "--passes", "fold-batchnorm")[0] == 0
    old = (out / "model.onnx").read_bytes()
    with monkeypatch.context() as m:
        calls = _interrupt_at(m, None, signal.SIGINT, False)
        assert run(capsys, *argv)[0] == 0
    n = len(calls)
    new = (out / "model.onnx").read_bytes()
    assert n > 10 and new != old, calls
    for k in range(n):
        for sig, after in ((signal.SIGINT, k % 2 == 0), (signal.SIGTERM, k % 2 == 1)):
            with monkeypatch.context() as m:
                _interrupt_at(m, k, sig, after)
                code = run(capsys, *argv)[0]
            assert code in (0, 130, 143), (k, sig, code)
            assert whole(out) and (out / "model.onnx").read_bytes() in (old, new), (k, sig)
            left = sorted(p.name for p in canary.root.iterdir() if p.name.startswith(".out"))
            assert not left, (k, sig, left)
            assert not list(canary.tmpdir.iterdir()), (k, sig)


def test_a_second_run_on_the_same_output_fails_at_once_and_cleanly(canary, capsys):
    out = canary.root / "out"
    canary.allow(out)
    assert run(capsys, "optimize", str(MODEL), "-o", str(out), *FAST)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with OutputDir(out, "optimize") as first:  # a run in progress on the same folder
        code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(out), *FAST, "--passes", "fold-batchnorm")
        refused(code, err, "another graphslim run", str(os.getpid()))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        first.write({"model.onnx": b"first"})
    assert (out / "model.onnx").read_bytes() == b"first"
    assert sorted(p.name for p in canary.root.iterdir() if p.name.startswith(".out")) == []


def test_two_processes_racing_on_one_output(canary):
    """Started together: each one wins whole or fails with one line; nothing is left over."""
    out = canary.root / "out"
    canary.allow(out)
    argv = [sys.executable, "-m", "graphslim.cli", "optimize", str(MODEL), "-o", str(out), *FAST]
    for _ in range(3):
        procs = [
            subprocess.Popen([*argv, "--passes", p], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in ("fold-batchnorm", "fold-batchnorm,prune-channels{ratio=0.5}")
        ]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert 0 in [c for c, _ in results], results
        for code, err in results:
            assert code in (0, 2), err
            if code == 2:
                assert "another graphslim run" in err and len(err.strip().splitlines()) == 1
        assert whole(out)
        report = json.loads((out / "report.json").read_text())
        assert hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() == report["output"]["sha256"]
        assert sorted(p.name for p in canary.root.iterdir() if p.name.startswith(".out")) == []


# --------------------------------------------------------------------------- the cache


def _damage(entry: Path, how: str) -> None:
    model = entry / "model.onnx"
    if how == "truncated model":
        model.write_bytes(model.read_bytes()[:1000])
    elif how == "bit-flipped model":
        b = bytearray(model.read_bytes())
        b[len(b) // 2] ^= 0x10
        model.write_bytes(bytes(b))
    elif how == "edited report":
        rep = json.loads((entry / "report.json").read_text())
        del rep["after"]
        (entry / "report.json").write_text(json.dumps(rep))
    elif how == "missing file":
        (entry / "report.md").unlink()
    elif how == "added file":
        (entry / "extra.onnx").write_bytes(model.read_bytes())
    elif how == "no checksums":
        (entry / MARKER).unlink()


@pytest.mark.parametrize(
    "how", ["truncated model", "bit-flipped model", "edited report", "missing file", "added file", "no checksums"]
)
def test_a_damaged_cache_entry_is_recomputed_never_served(canary, capsys, caplog, how):
    cache, a, b = canary.root / "cache", canary.root / "a", canary.root / "b"
    canary.allow(cache, a, b)
    argv = ["optimize", str(MODEL), "--passes", "fold-batchnorm,prune-channels{ratio=0.3}", *FAST]
    assert run(capsys, *argv, "-o", str(a), "--cache-dir", str(cache))[0] == 0
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert verify_output_dir(entry, "cache") == []
    _damage(entry, how)
    caplog.clear()
    code, out, _ = run(capsys, *argv, "-o", str(b), "--cache-dir", str(cache), "--json")
    assert code == 0
    assert json.loads(out)["cache"]["hit"] is False
    assert any("damaged" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert (b / "model.onnx").read_bytes() == (a / "model.onnx").read_bytes() and whole(b)
    assert verify_output_dir(entry, "cache") == []  # stored anew, whole
    code, out, _ = run(capsys, *argv, "-o", str(b), "--cache-dir", str(cache), "--json")
    assert (
        json.loads(out)["cache"]["hit"] is True and (b / "model.onnx").read_bytes() == (a / "model.onnx").read_bytes()
    )
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no lock or temporary left


# --------------------------------------------------------------------------- numbers that lie


@graphslim.register_pass
class _NanWeights(graphslim.Pass):
    """Test pass: claims to be exact and turns the first Conv weight into NaN."""

    name = "test-nan-weights"

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "Conv")
        w = graph.constant(conv.inputs[1])
        graph.set_constant(conv, 1, np.full_like(w, np.nan))
        return graphslim.PassResult(changed=True)


@graphslim.register_pass
class _Exits(graphslim.Pass):
    """Test pass: a plugin that calls sys.exit(0) in its run."""

    name = "test-exits"

    def run(self, graph, ctx):
        sys.exit(0)


def test_verify_fails_when_a_pass_turns_outputs_into_nan(canary, capsys):
    out = canary.root / "out"
    canary.allow(out)
    code, _, err = run(
        capsys, "optimize", str(MODEL), "-o", str(out), "--verify", *FAST, "--passes", "fold-batchnorm,test-nan-weights"
    )
    assert code == 1 and "test-nan-weights" in err and "NaN" in err and "fold-batchnorm" in err
    assert not out.exists()
    # Without --verify the report says so (and its JSON stays JSON).
    assert run(capsys, "optimize", str(MODEL), "-o", str(out), *FAST, "--passes", "test-nan-weights")[0] == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["fidelity"]["nonfinite"] > 0 and rep["fidelity"]["top1_agreement"] == 0.0


def test_compare_outputs_keeps_nan(canary):
    from graphslim.core.metrics import compare_outputs

    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = a.copy()
    b[1, 2] = np.nan
    fid = compare_outputs([a], [b])
    assert fid.nonfinite == 1 and fid.top1_agreement == 0.75
    assert compare_outputs([b], [b.copy()]).nonfinite == 0  # the same NaN is no change
    b[1, 2] = np.inf
    assert compare_outputs([a], [b]).nonfinite == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_data_is_a_data_error_naming_the_array(canary, capsys, bad):
    with np.load(DATA) as z:
        x, y = z["input"].copy(), z["labels"]
    x[7, 0, 3, 3] = bad
    data = canary.put("bad.npz", b"")
    np.savez(data, input=x, labels=y)
    canary.rebase()
    for argv in (
        ["optimize", str(MODEL), "-o", str(canary.root / "out"), "--data", str(data), "--verify", *FAST],
        ["eval", str(MODEL), "--data", str(data)],
        ["bench", str(MODEL), "--data", str(data), "--repeat", "1"],
    ):
        code, _, err = run(capsys, *argv)
        refused(code, err, "array 'input'", "NaN or Inf", "sample 7")


def test_all_nan_calibration_data_and_nan_in_a_shard(canary, capsys):
    with np.load(DATA) as z:
        x, y = z["input"].copy(), z["labels"]
    data = canary.put("nan.npz", b"")
    np.savez(data, input=np.full_like(x, np.nan), labels=y)
    shards = canary.root / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", input=x[:250], labels=y[:250])
    x[300] = np.nan
    np.savez(shards / "b.npz", input=x[250:], labels=y[250:])
    canary.rebase()
    code, _, err = run(
        capsys,
        "optimize",
        str(MODEL),
        "-o",
        str(canary.root / "o"),
        "--data",
        str(data),
        *FAST,
        "--passes",
        "quantize-int8",
    )
    refused(code, err, "NaN or Inf")
    # Shards stream: the bad one is found when read, inside a pass, and still exits 2.
    code, _, err = run(
        capsys,
        "optimize",
        str(MODEL),
        "-o",
        str(canary.root / "o"),
        "--data",
        str(shards),
        "--eval-data",
        str(DATA),
        *FAST,
        "--passes",
        "quantize-int8{sensitivity=false}",
    )
    refused(code, err, "b.npz", "NaN or Inf")


@pytest.mark.parametrize("labels", [10, -1, 1000])
def test_labels_outside_the_class_range_are_refused(canary, capsys, labels):
    with np.load(DATA) as z:
        x, y = z["input"], z["labels"].copy()
    y[5] = labels
    data = canary.put("labels.npz", b"")
    np.savez(data, input=x, labels=y)
    shards = canary.root / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", input=x[:250], labels=y[:250])
    np.savez(shards / "b.npz", input=x[250:], labels=y[250:])
    canary.rebase()
    for argv in (
        ["eval", str(MODEL), "--data", str(data)],
        ["optimize", str(MODEL), "-o", str(canary.root / "o"), "--data", str(data), "--max-accuracy-drop", "1", *FAST],
        ["optimize", str(MODEL), "-o", str(canary.root / "o"), "--data", str(shards), *FAST],
    ):
        code, _, err = run(capsys, *argv)
        refused(code, err, "labels must be class ids")


@pytest.mark.parametrize("flag", ["--max-accuracy-drop", "--min-compression", "--max-latency-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_budgets_are_refused(canary, capsys, flag, value):
    code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(canary.root / "o"), *FAST, f"{flag}={value}")
    refused(code, err, flag, "finite")
    with pytest.raises(InputError):
        graphslim.RunOptions.build(**{flag[2:].replace("-", "_"): float(value)})


def test_model_without_parameters_reports_r_as_undefined(canary, capsys):
    out = canary.root / "out"
    canary.allow(out)
    code, _, err = run(capsys, "optimize", str(CORPUS / "no_parameters.onnx"), "-o", str(out), "-q")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["compression"]["r_params"] is None and rep["before"]["params"] == 0
    assert "is undefined" in (out / "report.md").read_text()
    assert {"latency.png", "accuracy.png"} <= {p.name for p in out.iterdir()}  # what can be drawn
    assert run(capsys, "report", str(out))[0] == 0
    assert run(capsys, "compare", str(out), "-o", str(canary.root / "cmp"))[0] == 0
    canary.allow(canary.root / "cmp")


# --------------------------------------------------------------------------- resource limits


def test_yaml_alias_bomb_is_refused_in_one_short_line(canary):
    r = cli(
        "optimize",
        str(MODEL),
        "-o",
        str(canary.root / "o"),
        "--recipe",
        str(CORPUS / "alias_bomb.yaml"),
        limit_mb=LIMIT_MB,
    )
    refused(r.returncode, r.stderr, "more than 10,000 values")
    assert len(r.stderr) < 500


@pytest.mark.parametrize("bomb", ["zip_bomb.npz", "bzip2_bomb.npz"])
def test_npz_zip_bomb_is_refused_under_a_memory_limit(canary, bomb):
    """4 GiB of zeros in a few KB (bzip2) or 4 MB (deflate), read under a 1.5 GiB address space."""
    for argv in (
        ["eval", str(MODEL), "--data", str(CORPUS / bomb)],
        ["optimize", str(MODEL), "-o", str(canary.root / "o"), "--data", str(CORPUS / bomb), *FAST],
    ):
        r = cli(*argv, limit_mb=LIMIT_MB)
        refused(r.returncode, r.stderr, bomb)
    shards = canary.root / "shards"
    shards.mkdir()
    shutil.copy(CORPUS / bomb, shards / "a.npz")
    canary.rebase()
    r = cli("optimize", str(MODEL), "-o", str(canary.root / "o"), "--data", str(shards), *FAST, limit_mb=LIMIT_MB)
    refused(r.returncode, r.stderr, "a.npz")


def test_data_that_does_not_fit_in_memory_is_refused_before_it_is_read(canary):
    x = np.zeros((2 * 2**20, 1, 8, 8), np.float32)  # 512 MiB, stored uncompressed
    data = canary.put("big.npz", b"")
    np.savez(data, input=x)
    del x
    canary.rebase()
    r = cli("eval", str(MODEL), "--data", str(data), limit_mb=600)  # graphslim alone takes about 180 MB
    refused(r.returncode, r.stderr, "of memory available", "shards")
    r = cli("eval", str(MODEL), "--data", str(data))  # read, then refused for another reason
    refused(r.returncode, r.stderr, "no labels")


def test_constant_of_shape_bomb_is_refused_under_a_memory_limit(canary):
    bomb = str(CORPUS / "constant_of_shape_bomb.onnx")
    data = canary.put("x.npz", b"")
    np.savez(data, x=np.ones((4, 4), np.float32))
    canary.rebase()
    for argv in (
        ["optimize", bomb, "-o", str(canary.root / "o"), "-q"],
        ["optimize", bomb, "-o", str(canary.root / "o"), "-q", "--verify", "--passes", "fold-constants"],
        ["eval", bomb, "--data", str(data), "--reference", bomb],
        ["bench", bomb, "--repeat", "1"],
    ):
        r = cli(*argv, limit_mb=LIMIT_MB)
        refused(r.returncode, r.stderr, "node 'big' (ConstantOfShape)", "from constants")
    assert cli("inspect", bomb, limit_mb=LIMIT_MB).returncode == 0  # looking at it costs nothing


def test_fold_constants_bounds_intermediate_results(canary):
    """A 64 MiB ConstantOfShape feeding a ReduceSum: the result is one number, the intermediate
    is what max_mib must bound."""
    from onnx import TensorProto, helper

    from graphslim.core.ir import Graph
    from graphslim.pipeline import PassContext, PassManager

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [4096, 4096])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    g = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [shape],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for max_mib, folded in ((16, False), (100, True)):
        graph = Graph.from_model(model)
        graph.infer_shapes()
        PassManager(f"fold-constants{{max_mib={max_mib}}}").run(graph, PassContext())
        ops = [n.op for n in graph.nodes]
        assert ("ConstantOfShape" not in ops) is folded, (max_mib, ops)
    assert ops == ["Add"] and float(graph.constant(graph.nodes[0].inputs[1])) == 4096 * 4096


# --------------------------------------------------------------------------- clear errors


def _npy(canary):
    p = canary.put("data.npz", b"")
    np.save(canary.root / "data.npy", np.zeros((4, 1, 8, 8), np.float32))
    os.replace(canary.root / "data.npy", p)
    return ["eval", str(MODEL), "--data", str(p)], ".npy file"


def _object_arrays(canary):
    p = canary.root / "obj.npz"
    np.savez(p, input=np.array([np.zeros((1, 8, 8)), "x"], dtype=object))
    return ["eval", str(MODEL), "--data", str(p)], "Python objects"


def _not_a_zip(canary):
    p = canary.put("text.npz", b"input,labels\n1,2\n")
    return ["eval", str(MODEL), "--data", str(p)], "not an .npz file"


def _truncated_member(canary):
    p = canary.root / "cut.npz"
    with np.load(DATA) as z:
        np.savez(p, input=z["input"], labels=z["labels"])
    with zipfile.ZipFile(p) as zf:
        raw = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(p, "w") as zf:  # a member shorter than its header says
        zf.writestr("input.npy", raw["input.npy"][:1000])
        zf.writestr("labels.npy", raw["labels.npy"])
    return ["eval", str(MODEL), "--data", str(p)], "truncated or forged"


def _recipe(name: str, needle: str):
    def make(canary):
        return ["optimize", str(MODEL), "-o", str(canary.root / "o"), "--recipe", str(CORPUS / name)], needle

    return make


def _pipeline_text(text: str, needle: str):
    def make(canary):
        return ["optimize", str(MODEL), "-o", str(canary.root / "o"), "--passes", text], needle

    return make


def _external_offset(offset: str, length: str | None):
    def make(canary):
        model = _external_model(canary)
        m = onnx.load(str(model), load_external_data=False)
        t = next(i for i in m.graph.initializer if i.external_data)
        for e in t.external_data:
            if e.key == "offset":
                e.value = offset
        if not any(e.key == "offset" for e in t.external_data):
            t.external_data.add(key="offset", value=offset)
        for e in list(t.external_data):
            if e.key == "length":
                t.external_data.remove(e)
        if length is not None:
            t.external_data.add(key="length", value=length)
        model.write_bytes(m.SerializeToString())
        return ["optimize", str(model), "-o", str(canary.root / "o"), *FAST], "external data"

    return make


def _data_function(body: str, needle: str):
    def make(canary):
        (canary.root / "userdata.py").write_text(f"def batches():\n    {body}\n")
        sys.modules.pop("userdata", None)
        return ["eval", str(MODEL), "--data", "userdata:batches"], needle

    return make


BAD_INPUTS = {
    "npy given as npz": _npy,
    "object arrays": _object_arrays,
    "not a zip": _not_a_zip,
    "truncated member": _truncated_member,
    "recipe not UTF-8": _recipe("not_utf8.json", "not UTF-8"),
    "recipe with a 4000-digit integer": _recipe("huge_int.json", "4000 digits"),
    "recipe nested 5000 deep (JSON)": _recipe("deep.json", "nested too deeply"),
    "recipe nested 5000 deep (YAML)": _recipe("deep.yaml", "nested too deeply"),
    "integer past int32 in pipeline text": _pipeline_text(
        "prune-channels{round_to=99999999999999999999}", "out of range"
    ),
    "lists nested deep in pipeline text": _pipeline_text(
        "prune-channels{exclude=" + "[" * 500 + "]" * 500 + "}", "nested"
    ),
    "external data offset past the end": _external_offset("99999999", None),
    "external data offset + length past the end": _external_offset("1000", "99999999"),
    "external data offset not a number": _external_offset("zero", None),
    "data function calls sys.exit": _data_function("raise SystemExit(0)", "SystemExit"),
    "data function raises": _data_function("return 1 / 0", "ZeroDivisionError"),
    "data function yields objects": _data_function("yield {'input': [object()]}", "dtype object"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(canary, capsys, monkeypatch, case):
    monkeypatch.syspath_prepend(str(canary.root))  # for the data functions
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    argv, needle = BAD_INPUTS[case](canary)
    canary.rebase()
    code, _, err = run(capsys, *argv)
    refused(code, err, needle)
    assert len(err) < 1500


def test_bench_runs_the_batch_sizes_a_fixed_batch_model_allows(canary, capsys):
    code, out, err = run(capsys, "bench", str(CORPUS / "fixed_batch.onnx"), "--repeat", "3", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [r["batch"] for r in rep["results"]] == [1]
    assert rep["skipped"] == [{"what": "model", "batch": 32, "reason": "the model's batch is fixed at 1"}]
    code, out, err = run(capsys, "bench", str(CORPUS / "fixed_batch.onnx"), "--repeat", "3", "--batch", "8")
    assert code == 0 and "skipped: model at batch 8 (the model's batch is fixed at 1)" in out
    header, row = out.splitlines()[0].split(), out.splitlines()[1].split()
    assert row[header.index("batch")] == "1"


def test_a_plugin_pass_calling_sys_exit_is_a_failure(canary, capsys):
    out = canary.root / "out"
    code, _, err = run(capsys, "optimize", str(MODEL), "-o", str(out), *FAST, "--passes", "fold-batchnorm,test-exits")
    assert code == 1 and "pass 'test-exits' failed" in err and "sys.exit(0)" in err
    assert not out.exists()


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_json_is_one_document_on_stdout(canary, calibration, quiet):
    out = canary.root / "out"
    canary.allow(out)
    r = cli(
        "optimize",
        str(MODEL),
        "-o",
        str(out),
        "--data",
        str(DATA),
        "--no-latency",
        "--json",
        *quiet,
        "--passes",
        f"quantize-int8{{calibration={calibration},sensitivity=false,calibration_samples=32}}",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pipeline"].startswith("quantize-int8")  # exactly one document
    assert "Collecting tensor data" not in r.stdout + r.stderr  # library chatter: logged, shown with -v
    r = cli("eval", str(MODEL), "--data", str(DATA), "--json", "-v")
    assert r.returncode == 0 and json.loads(r.stdout)["samples"] == 497


def test_library_prints_and_onnxruntime_warnings_show_with_verbose(canary):
    out = canary.root / "out"
    canary.allow(out)
    argv = ["optimize", str(MODEL), "-o", str(out), "--data", str(DATA), "--no-latency", "--passes"]
    passes = "quantize-int8{calibration=entropy,sensitivity=false,calibration_samples=32}"
    r = cli(*argv, passes, "-v")
    assert r.returncode == 0 and "graphslim: INFO: Collecting tensor data" in r.stderr
    # ONNX Runtime's native log follows graphslim's level: a session on a model with an unused
    # initializer warns about it only with -v.
    m = onnx.load(str(MODEL))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    path = canary.put("unused.onnx", m.SerializeToString())
    snippet = (
        "import logging, sys; logging.basicConfig(level=int(sys.argv[2]));"
        "from graphslim.core.runtime import require_onnxruntime;"
        "ort = require_onnxruntime(); ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    )
    # This snippet is not graphslim (whose commands keep their temporaries in a scratch folder):
    # onnxruntime >= 1.2x writes a .ses file into TMPDIR when imported; give it its own.
    scratch = canary.root / "snippet-tmp"
    canary.allow(scratch)
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    quiet = subprocess.run([sys.executable, "-c", snippet, str(path), "30"], capture_output=True, text=True, env=env)
    loud = subprocess.run([sys.executable, "-c", snippet, str(path), "20"], capture_output=True, text=True, env=env)
    assert quiet.returncode == loud.returncode == 0
    assert "onnxruntime" not in quiet.stderr and "Removing initializer 'unused'" in loud.stderr
