"""Remote devices through TVM's RPC tracker (graphslim.backend.remote): a real tracker and real
RPC servers on loopback (``python -m tvm.exec.rpc_tracker``, ``python -m tvm.exec.rpc_server
--tracker ... --key ...``) stand in for boards; graphslim lists them, runs and times artifacts
there, tunes through them, and fails with one line when a device is missing, busy or killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE

pytest.importorskip("tvm", reason="needs the tvm extra (apache-tvm)")
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (in the tvm extra)")

from graphslim.backend import compile_model, load_artifact  # noqa: E402
from graphslim.backend.remote import (  # noqa: E402
    DeviceError,
    list_devices,
    measure_artifact,
    open_session,
    run_artifact,
)
from graphslim.cli import main  # noqa: E402
from graphslim.core.data import Dataset  # noqa: E402
from graphslim.core.errors import InputError  # noqa: E402
from graphslim.core.runtime import ort_session  # noqa: E402

MODEL = EXAMPLE / "model.onnx"
DATA = EXAMPLE / "data.npz"
# Starting a tracker or a server imports TVM (seconds; more on a loaded machine): how long to
# wait for one to register before the test fails with the logs.
READY_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A TVM RPC tracker and RPC servers on 127.0.0.1, each in its own process group (so that a
    kill takes the server's session processes too); their temporary files stay in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        # One thread per server: on this 2-core machine several servers and the client share the CPUs.
        self.env = {**os.environ, "TVM_NUM_THREADS": "1", "TMPDIR": str(root / "tmp")}
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._start(
            "tracker",
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--port-end",
                str(self.port + 1),
            ],
        )
        self.tracker = self.procs[0]
        self._wait(lambda: _answers(self.port), "the tracker")

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}-{len(self.procs)}.log", "w")
        p = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def _wait(self, ready, what: str) -> None:
        start = time.monotonic()
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() - start > READY_S:
                logs = "\n".join(f"{f.name}: {f.read_text()[-2000:]}" for f in sorted(self.root.glob("*.log")))
                exits = [(" ".join(map(str, p.args[:4])), p.returncode) for p in dead]
                raise AssertionError(f"{what} did not come up (exited: {exits}):\n{logs}")
            time.sleep(0.5)

    def server(self, key: str, argv: list[str] | None = None) -> subprocess.Popen:
        """Start a server registered under ``key`` (``argv``: another command, e.g. under qemu)
        and wait until the tracker lists it as free."""
        before = self.count(key)
        port = _free_port()
        cmd = argv or [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--tracker",
            self.address,
            "--key",
            key,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ]
        p = self._start(f"server-{key}", cmd)
        self._wait(lambda: self.count(key, free=True) > before, f"the RPC server for key '{key}'")
        return p

    def count(self, key: str, free: bool = False) -> int:
        for d in list_devices(self.address):
            if d["key"] == key:
                return d["free"] if free else d["devices"]
        return 0

    def wait_free(self, key: str, n: int) -> None:
        """Servers offer themselves again a moment after a session ends."""
        self._wait(lambda: self.count(key, free=True) >= n, f"{n} free device(s) of key '{key}'")

    def kill(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the group: the server and the session it forked
        p.wait()

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                self.kill(p)
            except ProcessLookupError:
                pass


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tracker with two x86 servers under the key 'loopback' (shared by this module's tests)."""
    c = Cluster(tmp_path_factory.mktemp("rpc"))
    try:
        c.server("loopback")
        c.server("loopback")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The example CNN compiled for this machine at batch 8."""
    out = tmp_path_factory.mktemp("art") / "c"
    compile_model(onnx.load(str(MODEL)), "x86", out, batch=8)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- without a tracker


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", str(MODEL), "--target", "x86"], "--rpc-tracker HOST:PORT --rpc-key KEY"),
        (["bench", str(MODEL), "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k"], "give --target"),
        (["bench", str(MODEL), "--rpc-tracker", "127.0.0.1:1"], "go together"),
        (["bench", str(MODEL), "--rpc-tracker", "nohostport", "--rpc-key", "k"], "HOST:PORT"),
        (
            ["bench", str(MODEL), "--target", "x86", "--rpc-tracker", "h:1", "--rpc-key", "k", "--rpc-timeout", "0"],
            "> 0",
        ),
        (["run", str(EXAMPLE), "--data", str(DATA), "--rpc-key", "k"], "go together"),
        (["optimize", str(MODEL), "-o", "OUT", "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k"], "give --target"),
    ],
)
def test_device_flags_are_checked_before_any_work(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_device_travels_in_the_compile_options():
    from graphslim.run.options import RunOptions

    opts = RunOptions.build(target="arm", rpc=["127.0.0.1:9190", "rasp4"], rpc_timeout=5)
    assert opts.compile.rpc == ("127.0.0.1:9190", "rasp4") and opts.compile.rpc_timeout == 5
    for bad, message in [(("127.0.0.1", "k"), "HOST:PORT"), (("h:1", " "), "--rpc-key"), ("h:1", "expected")]:
        with pytest.raises(InputError, match=message):
            RunOptions.build(target="arm", rpc=bad)
    with pytest.raises(InputError, match="rpc-timeout"):
        RunOptions.build(target="arm", rpc=("h:1", "k"), rpc_timeout=0)


def test_an_unreachable_tracker_is_one_line_without_waiting(capsys):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    code, _, err = _run(["devices", "--rpc-tracker", f"127.0.0.1:{port}"], capsys)
    assert code == 2
    assert f"no RPC tracker answers at 127.0.0.1:{port}" in err and "tvm.exec.rpc_tracker" in err
    # TVM's own client retries a refused connection for a minute; this one does not retry.
    assert time.monotonic() - t0 < 60


# --------------------------------------------------------------------------- one tracker, two servers


def test_devices_lists_the_keys_with_free_and_in_use(cluster, capsys):
    code, out, _ = _run(["devices", "--rpc-tracker", cluster.address, "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["tracker"] == cluster.address
    (entry,) = [k for k in doc["keys"] if k["key"] == "loopback"]
    assert entry["devices"] == 2 and entry["free"] == 2 and entry["in_use"] == 0
    assert len(set(entry["servers"])) == 2 and all(s.startswith("127.0.0.1:") for s in entry["servers"])
    # While a session holds one device, the tracker shows it in use.
    with open_session((cluster.address, "loopback")):
        busy = {d["key"]: d for d in list_devices(cluster.address)}["loopback"]
        assert busy["free"] == 1 and busy["in_use"] == 1
    cluster.wait_free("loopback", 2)
    code, out, _ = _run(["devices", "--rpc-tracker", cluster.address], capsys)
    assert code == 0 and "loopback" in out and "in use" in out


def test_an_unknown_key_names_the_keys_the_tracker_has(cluster, artifact, capsys):
    code, _, err = _run(["bench", str(artifact), "--rpc-tracker", cluster.address, "--rpc-key", "jetson"], capsys)
    assert code == 2
    assert "no device with key 'jetson'" in err and "'loopback' (2 device(s), 2 free)" in err
    with pytest.raises(InputError, match="no device with key 'rasp4'"):
        run_artifact(artifact, (cluster.address, "rasp4"), [])


def test_no_free_device_times_out_with_a_clear_message(cluster, artifact, capsys):
    """Both devices busy: the request gives up after --rpc-timeout instead of queueing forever."""
    with open_session((cluster.address, "loopback")), open_session((cluster.address, "loopback")):
        code, _, err = _run(
            ["bench", str(artifact), "--rpc-tracker", cluster.address, "--rpc-key", "loopback", "--rpc-timeout", "2"],
            capsys,
        )
    assert code == 1, err
    assert "no free device with key 'loopback'" in err and "within 2 s" in err and "2 device(s), 0 free" in err
    assert len(err.strip().splitlines()) == 1
    cluster.wait_free("loopback", 2)


def test_run_on_a_device_matches_the_local_run(cluster, artifact, capsys):
    """The same library run on a device of the tracker and here gives the same outputs, and the
    `run` command reports the same accuracy and fidelity to ONNX Runtime."""
    x = np.load(DATA)["input"]
    feeds = [{"input": x[i : i + 8]} for i in range(0, 64, 8)]
    remote = run_artifact(artifact, (cluster.address, "loopback"), feeds)
    local = load_artifact(artifact)
    for got, f in zip(remote, feeds, strict=True):
        np.testing.assert_array_equal(got[0], local(f)[0])
    ort = ort_session(onnx.load(str(MODEL))).run(None, feeds[0])[0]
    np.testing.assert_allclose(remote[0][0], ort, rtol=1e-4, atol=1e-4)

    args = ["run", str(artifact), "--data", str(DATA), "--reference", str(MODEL), "--json"]
    cluster.wait_free("loopback", 2)
    code, out, _ = _run([*args, "--rpc-tracker", cluster.address, "--rpc-key", "loopback"], capsys)
    assert code == 0
    on_device = json.loads(out)
    code, out, _ = _run(args, capsys)
    here = json.loads(out)
    assert on_device["device"] == {"tracker": cluster.address, "key": "loopback"}
    assert on_device["samples"] == here["samples"] == 497
    assert on_device["accuracy"] == here["accuracy"] > 0.95
    assert on_device["fidelity"]["max_abs_diff"] == here["fidelity"]["max_abs_diff"] < 1e-3


def test_bench_times_on_both_devices_in_parallel(cluster, artifact, capsys):
    """The timed runs are split over the key's two free devices; the figures come from the
    device's own clock."""
    cluster.wait_free("loopback", 2)
    code, out, _ = _run(
        [
            "bench",
            str(artifact),
            "--rpc-tracker",
            cluster.address,
            "--rpc-key",
            "loopback",
            "--repeat",
            "40",
            "--warmup",
            "2",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    (row,) = json.loads(out)["results"]
    assert row["key"] == "loopback" and row["target"] == "x86" and row["batch"] == 8
    assert row["runs"] == 40 and row["retries"] == 0
    assert len(row["devices"]) == 2 and len({d["server"] for d in row["devices"]}) == 2
    assert sorted(d["runs"] for d in row["devices"]) == [20, 20]
    assert 0 < row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]


def test_bench_builds_an_onnx_model_per_batch_and_times_it_beside_onnx_runtime(cluster, capsys):
    cluster.wait_free("loopback", 2)
    code, out, _ = _run(
        [
            "bench",
            str(MODEL),
            "--target",
            "x86",
            "--batch",
            "1,4",
            "--baseline",
            str(MODEL),
            "--rpc-tracker",
            cluster.address,
            "--rpc-key",
            "loopback",
            "--repeat",
            "10",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    rows = json.loads(out)["results"]
    device = [r for r in rows if r["runtime"].startswith("tvm")]
    assert [r["batch"] for r in device] == [1, 4] and all(r["key"] == "loopback" for r in device)
    assert {(r["what"], r["batch"]) for r in rows if r["runtime"] == "onnxruntime"} == {
        (w, b) for w in ("baseline", "model") for b in (1, 4)
    }
    assert all(r["vs_baseline"] > 0 for r in device)


def test_optimize_puts_the_device_latency_in_the_report(cluster, tmp_path, capsys):
    import jsonschema

    from graphslim.report import load_report

    cluster.wait_free("loopback", 2)
    out = tmp_path / "out"
    code, text, _ = _run(
        [
            "optimize",
            str(MODEL),
            "-o",
            str(out),
            "--target",
            "x86",
            "--rpc-tracker",
            cluster.address,
            "--rpc-key",
            "loopback",
        ],
        capsys,
    )
    assert code == 0
    assert "latency device 'loopback', compiled result" in text
    rep = json.loads((out / "report.json").read_text())
    dev = rep["latency"]["device"]
    assert dev["key"] == "loopback" and dev["tracker"] == cluster.address and dev["target"] == "x86"
    assert dev["batch"] == 1 and dev["runs"] == 30 and dev["median_ms"] > 0 and dev["devices"]
    assert rep["latency"]["ort_original"]["median_ms"] > 0  # the local figure beside it
    schema = json.loads((Path(__file__).parents[1] / "graphslim" / "report" / "schema.json").read_text())
    jsonschema.validate(rep, schema)
    load_report(out)
    assert "device 'loopback'" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "loopback" in html and f"via tracker {cluster.address}" in html
    # A device field that breaks the schema is caught.
    del rep["latency"]["device"]["key"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rep, schema)


# --------------------------------------------------------------------------- killed devices


@pytest.mark.slow
def test_search_times_its_candidates_on_the_device(cluster, tmp_path, capsys):
    """`graphslim search --objective latency --target x86 --rpc-tracker ... --rpc-key ...`: the
    latency table and the end-to-end validation are timed on devices of the key (the report says
    which), and the chosen model's report carries the device latency."""
    pytest.importorskip("optuna", reason="search needs optuna (the search extra)")
    from models import mlp_with_data

    path, train, held = mlp_with_data(tmp_path, 64, 64)
    rpc = ["--rpc-tracker", cluster.address, "--rpc-key", "loopback"]
    argv = ["search", str(path), "-o", str(tmp_path / "out"), "--train-data", str(train)]
    argv += ["--eval-data", str(held), "--objective", "latency", "--target", "x86", *rpc]
    argv += ["--trials", "2", "--techniques", "prune", "--sensitivity-samples", "32", "--validate", "1", "--json"]
    argv += ["--max-accuracy-drop", "60"]  # random weights: agreement falls fast; candidates must pass
    assert main(["search", str(path), "-o", str(tmp_path / "x"), "--objective", "latency", *rpc]) == 2
    assert "--target" in capsys.readouterr().err  # a device times compiled candidates only
    cluster.wait_free("loopback", 2)
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["search"]["runtime"] == "tvm x86 on a device of key 'loopback'"
    assert rep["search"]["latency_table"]["runtime"] == rep["search"]["runtime"]
    assert rep["search"]["latency_table"]["timed_by_this_process"] > 0  # layers timed on the device
    assert rep["search"]["latency_table"]["original_ms"] > 0
    assert rep["latency"]["device"]["key"] == "loopback" and rep["latency"]["device"]["runs"] > 0


@pytest.mark.slow
def test_a_device_killed_mid_benchmark_has_its_share_timed_on_the_other(tmp_path):
    c = Cluster(tmp_path / "rpc")
    try:
        doomed = c.server("flaky")
        c.server("flaky")
        art = tmp_path / "art"
        compile_model(onnx.load(str(MODEL)), "x86", art, batch=32)
        result: dict = {}

        def bench() -> None:
            try:
                result["ok"] = measure_artifact(
                    art,
                    (c.address, "flaky"),
                    Dataset({"input": np.load(DATA)["input"]}),
                    warmup=2,
                    repeat=10**6,
                    max_seconds=6,
                    wait_s=60,
                )
            except BaseException as e:  # noqa: BLE001 - reported below
                result["error"] = e

        t = threading.Thread(target=bench)
        t.start()
        c._wait(lambda: c.count("flaky", free=True) == 0 or not t.is_alive(), "both devices in use")
        time.sleep(1)  # inside the timed runs
        c.kill(doomed)
        t.join()
    finally:
        c.close()
    assert "error" not in result, result.get("error")
    r = result["ok"]
    assert r["retries"] == 1 and len(r["devices"]) == 2
    assert len({d["server"] for d in r["devices"]}) == 1  # both shares timed by the survivor
    assert r["runs"] == sum(d["runs"] for d in r["devices"]) >= 6


@pytest.mark.slow
def test_a_device_killed_mid_run_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    """The only device of the key dies while optimize times the result on it: one line naming
    the device, the key and what happened; the output folder is not created."""
    from models import ModelBuilder

    # Convolutions big enough (about 0.9 GMAC) that timing them on the device takes seconds, in
    # which the device is killed.
    mb = ModelBuilder("heavy", in_shape=(1, 64, 112, 112))
    x = mb.relu(mb.conv(mb.relu(mb.conv("input", 64)), 64))
    onnx.save(mb.build(x), str(tmp_path / "heavy.onnx"))
    c = Cluster(tmp_path / "rpc")
    out = tmp_path / "out"
    try:
        doomed = c.server("only")
        killer = threading.Thread(
            target=lambda: (c._wait(lambda: c.count("only", free=True) == 0, "the device in use"), c.kill(doomed)),
            daemon=True,
        )
        killer.start()
        code = main(
            [
                "optimize",
                str(tmp_path / "heavy.onnx"),
                "-o",
                str(out),
                "--target",
                "x86",
                "--rpc-tracker",
                c.address,
                "--rpc-key",
                "only",
                "--rpc-timeout",
                "3",
            ]
        )
        killer.join(READY_S)
    finally:
        c.close()
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("graphslim: error")]
    assert len(lines) == 1, err
    assert "key 'only'" in lines[0] and "connection was lost" in lines[0] and "another device" in lines[0]
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --------------------------------------------------------------------------- tuning through devices


def _records(folder: Path) -> list[float]:
    lines = (folder / "database_tuning_record.json").read_text().splitlines()
    return [json.loads(line)[1][1][0] for line in lines]


@pytest.mark.slow
def test_tuning_uses_both_devices_and_a_database_keyed_by_target_and_device(tmp_path, capsys, monkeypatch):
    """MetaSchedule's RPC runner measures on the key's two devices at once; the records go to
    the database under the device key and target, a second build for that key reuses them, and
    a build measured here (no device) does not take them."""
    import tempfile

    from models import ARCHITECTURES, run, sample_inputs

    # MetaSchedule's builder leaves candidate libraries in the temporary folder: keep it in tmp_path.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    model = ARCHITECTURES["mlp"]()
    onnx.save(model, str(tmp_path / "m.onnx"))
    c = Cluster(tmp_path / "rpc")
    try:
        c.server("pair")
        c.server("pair")
        base = ["compile", str(tmp_path / "m.onnx"), "--target", "x86", "--tuning-db", str(tmp_path / "db"), "--json"]
        rpc = ["--rpc-tracker", c.address, "--rpc-key", "pair"]
        code, out, err = _run([*base, *rpc, "--tune", "12", "-o", str(tmp_path / "a1")], capsys)
        assert code == 0, err
        first = json.loads(out)["tuning"]
        # The next build for this target and key: the records are there (--tune 0 applies them).
        code, out, err = _run([*base, *rpc, "--tune", "0", "-o", str(tmp_path / "a2")], capsys)
        assert code == 0, err
        second = json.loads(out)["tuning"]
    finally:
        c.close()
    assert first["runner"] == "rpc" and first["device_key"] == "pair" and first["devices"] == 2
    assert first["tasks_tuned"] == first["tasks"] >= 3
    # Both servers loaded candidates to measure (their logs say so).
    logs = sorted((tmp_path / "rpc").glob("server-pair-*.log"))
    assert len(logs) == 2 and all("load_module" in f.read_text() for f in logs)
    (folder,) = (tmp_path / "db").glob("rpc-pair/*")
    assert Path(first["database"]) == folder
    secs = _records(folder)
    assert secs and min(secs) < 1  # measured on the devices (a failed measurement records 1e10 s)
    assert second["database"] == first["database"] and second["tasks_from_database"] == first["tasks"]
    assert json.loads((tmp_path / "a2" / "artifact.json").read_text())["schedules"] == {"database": first["tasks"]}
    # Built without a device, the same folder has no records for it: nothing is taken from the device's.
    code, out, err = _run([*base, "--tune", "0", "-o", str(tmp_path / "a3")], capsys)
    assert code == 0, err
    local = json.loads(out)["tuning"]
    assert local["runner"] == "local" and local["tasks_from_database"] == 0
    feeds = sample_inputs(model, 1)
    for folder in ("a1", "a2"):
        np.testing.assert_allclose(
            load_artifact(tmp_path / folder)(feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4
        )


# --------------------------------------------------------------------------- an AArch64 device under qemu

# tvm.exec.rpc_server starts its server in a helper process it spawns with sys.executable; under
# qemu-user without binfmt_misc (as in this container) the emulated Python cannot exec another
# aarch64 binary, so the test starts the same server state in-process (sessions are still forked
# per client, as on a board). On a real board, `python3 -m tvm.exec.rpc_server` does this.
_ARM_SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
from tvm.rpc.server import PopenRPCServerState

host, port = sys.argv[2].rsplit(":", 1)
own = int(sys.argv[4])
state = PopenRPCServerState("127.0.0.1", own, own + 1, tracker_addr=(host, int(port)), key=sys.argv[3], silent=True)
state.thread.join()
"""


@pytest.mark.slow
def test_an_aarch64_device_under_qemu_runs_and_times_the_arm_artifact(tmp_path, capsys):
    """An RPC server in an aarch64 Python with TVM's runtime, under qemu-user, registered with the
    tracker as a board: the arm artifact built here is uploaded, run (outputs match ONNX Runtime
    on x86) and timed there, and optimize --target arm puts its latency in the report."""
    import shutil

    sysroot = os.environ.get("GRAPHSLIM_AARCH64_SYSROOT")
    qemu = shutil.which("qemu-aarch64-static")
    if not sysroot or not qemu or not Path(sysroot, "root/usr/bin/python3.11").exists():
        pytest.skip("needs qemu-user-static and GRAPHSLIM_AARCH64_SYSROOT (.ci/aarch64-sysroot.sh)")
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("needs gcc-aarch64-linux-gnu to link the ARM library")
    art = tmp_path / "arm"
    compile_model(onnx.load(str(MODEL)), "arm", art, batch=4)
    x = np.load(DATA)["input"][:32]
    labels = np.load(DATA)["labels"][:32]
    np.savez(tmp_path / "d.npz", input=x, labels=labels)
    (tmp_path / "arm_server.py").write_text(_ARM_SERVER)
    c = Cluster(tmp_path / "rpc")
    try:
        argv = [
            qemu,
            "-L",
            f"{sysroot}/root",
            f"{sysroot}/root/usr/bin/python3.11",
            str(tmp_path / "arm_server.py"),
            f"{sysroot}/site",
            c.address,
            "arm64",
            str(_free_port()),
        ]
        c.server("arm64", argv)
        rpc = ["--rpc-tracker", c.address, "--rpc-key", "arm64"]
        code, out, err = _run(
            ["run", str(art), "--data", str(tmp_path / "d.npz"), "--reference", str(MODEL), *rpc, "--json"], capsys
        )
        assert code == 0, err
        ran = json.loads(out)
        c.wait_free("arm64", 1)
        code, out, err = _run(["bench", str(art), *rpc, "--repeat", "5", "--warmup", "1", "--json"], capsys)
        assert code == 0, err
        (row,) = json.loads(out)["results"]
        c.wait_free("arm64", 1)
        code, _, err = _run(["optimize", str(MODEL), "-o", str(tmp_path / "out"), "--target", "arm", *rpc], capsys)
        assert code == 0, err
    finally:
        c.close()
    assert ran["samples"] == 32 and ran["fidelity"]["max_abs_diff"] < 1e-4 and ran["fidelity"]["top1_agreement"] == 1.0
    assert row["target"] == "arm" and row["runs"] == 5 and row["median_ms"] > 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["latency"]["device"]["key"] == "arm64" and rep["latency"]["device"]["target"] == "arm"
    assert "tvm_compiled" not in rep["latency"]  # an AArch64 library does not run here
    assert (tmp_path / "out" / "compiled" / "model.so").exists()


def test_device_error_is_a_graphslim_error():
    from graphslim.core.errors import GraphslimError

    assert issubclass(DeviceError, GraphslimError) and DeviceError.exit_code == 1


def test_a_slow_first_run_does_not_cut_the_timed_runs_short():
    """The number of timed runs comes from the fastest warm-up run: a fresh VM's first run (here
    200x a steady one) must not shrink ``max_seconds`` of runs to a handful."""
    from graphslim.backend.remote import RemoteArtifact

    asked: list[int] = []

    class VM:
        def time_evaluator(self, name, device, number, repeat):
            asked.append(repeat)
            warm = [0.2, 0.001][:repeat]  # seconds: the first run is slow

            def timer(fn):
                return type("R", (), {"results": warm if len(asked) == 1 else [0.001] * repeat})()

            return timer

    art = object.__new__(RemoteArtifact)
    art.vm, art.device, art.session = VM(), None, None
    times = art.time(warmup=2, repeat=10**6, max_seconds=6)
    assert asked == [2, 6000] and len(times) == 6000 and times[0] == pytest.approx(1.0)
