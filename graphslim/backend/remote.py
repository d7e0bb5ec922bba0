"""Devices behind a TVM RPC tracker: list them, run and time compiled artifacts on them.

Teams keep their boards (phones, Raspberry Pi / Jetson boards, GPU servers) behind TVM's RPC
tracker: one ``python -m tvm.exec.rpc_tracker`` process, and on every board an RPC server
(``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``) registered under a device key.
graphslim is a client of that engine, as TVM's own ``tvmc`` is: it asks the tracker for a free
device with the key, uploads the library it built here, loads it in a Relax VM on the device and
times it there with the remote ``time_evaluator`` (the clock runs on the device, so the network
is not in the figures).

What this module adds to ``tvm.rpc``:

* a timeout on the request for a device (the tracker queues a request until a device is free and
  ``TrackerSession.request`` waits forever), and on reaching the tracker (``connect_with_retry``
  retries for a minute);
* one-line errors that name the key asked for and what the tracker has (:class:`DeviceError`
  when a device fails or stops answering, :class:`~graphslim.core.errors.InputError` for an
  unreachable tracker or a key it does not know);
* timing spread over every free device of a key in parallel, and a retry of a device's share on
  another device when one stops answering.

The device travels as ``CompileOptions.rpc`` = (tracker ``"host:port"``, key); MetaSchedule's RPC
runner (``graphslim.kernels.tuning``) uses the same pair for tuning.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphslim.backend.bench import summarize_times
from graphslim.core.errors import GraphslimError, InputError

__all__ = [
    "DEFAULT_WAIT_S",
    "DeviceError",
    "RemoteArtifact",
    "Session",
    "Tracker",
    "check_key",
    "list_devices",
    "measure_artifact",
    "measure_model",
    "open_session",
    "read_meta",
    "run_artifact",
]

log = logging.getLogger(__name__)

#: How long to wait for a free device of a key before giving up (``--rpc-timeout``).
DEFAULT_WAIT_S = 60.0
#: How long the tracker may take to answer a connection or a summary.
TRACKER_TIMEOUT_S = 10.0
#: Sessions longer than this are ended by the server (a guard against a hung device).
SESSION_TIMEOUT_S = 600
#: Attempts per unit of work (a device's share of the timed runs, a run over the data): the first,
#: and one more on another device when a device stops answering.
ATTEMPTS = 2


class DeviceError(GraphslimError):
    """A device (or the tracker) failed or stopped answering; the message names the key, the
    device and what it was doing."""


@dataclass(frozen=True)
class Tracker:
    """A TVM RPC tracker's address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Tracker:
        host, sep, port = str(text).strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--rpc-tracker: expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# The tracker's wire protocol (tvm/rpc/base.py and tvm/rpc/tracker.py: a magic number, then JSON
# messages with a little-endian int32 length). Spoken here directly so that listing devices and
# the errors about an unreachable tracker or an unknown key do not wait for TVM to import.
_TRACKER_MAGIC = 0x2F271
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6


def _send(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            raise ConnectionResetError("the tracker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    size = struct.unpack("<i", _recv_exact(sock, 4))[0]
    return json.loads(_recv_exact(sock, size).decode())


def _connect_tracker(tracker: Tracker) -> socket.socket:
    """A socket to the tracker after its handshake; an :class:`InputError` that says how to
    start one when nothing answers (TVM's own client retries for a minute instead)."""
    hint = f"start one with: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {tracker.port}"
    try:
        sock = socket.create_connection((tracker.host, tracker.port), timeout=TRACKER_TIMEOUT_S)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InputError(f"no RPC tracker answers at {tracker} ({reason}); {hint}") from None
    try:
        sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        magic = struct.unpack("<i", _recv_exact(sock, 4))[0]
    except OSError as e:
        sock.close()
        raise InputError(f"{tracker} is not a TVM RPC tracker ({e}); {hint}") from None
    if magic != _TRACKER_MAGIC:
        sock.close()
        raise InputError(f"{tracker} is not a TVM RPC tracker; {hint}")
    return sock


def list_devices(tracker: str | Tracker) -> list[dict[str, Any]]:
    """The device keys the tracker has, from its summary: per key ``key``, ``devices`` (servers
    registered), ``free``, ``in_use``, ``pending`` (requests waiting) and ``servers``
    (``host:port`` of each), sorted by key. Keys without a registered server are left out."""
    t = tracker if isinstance(tracker, Tracker) else Tracker.parse(tracker)
    sock = _connect_tracker(t)
    try:
        _send(sock, [_SUMMARY])
        reply = _recv(sock)
    except (OSError, ValueError) as e:
        raise DeviceError(f"the RPC tracker at {t} did not answer its summary ({e})") from None
    finally:
        sock.close()
    if not isinstance(reply, list) or reply[0] != _SUCCESS:
        raise DeviceError(f"the RPC tracker at {t} answered its summary with {reply!r}")
    summary = reply[1]
    servers: dict[str, list[str]] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", "")).split(":", 1)[-1]  # 'server:rasp4' -> 'rasp4'
        host, port = (list(item.get("addr") or []) + [None, None])[:2]
        servers.setdefault(key, []).append(f"{host}:{port}")
    out = []
    for key in sorted(servers):
        queue = summary.get("queue_info", {}).get(key, {})
        total, free = len(servers[key]), int(queue.get("free", 0))
        out.append(
            {
                "key": key,
                "devices": total,
                "free": free,
                "in_use": max(0, total - free),
                "pending": int(queue.get("pending", 0)),
                "servers": sorted(servers[key]),
            }
        )
    return out


def _describe(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "none registered"
    return ", ".join(f"'{d['key']}' ({d['devices']} device(s), {d['free']} free)" for d in devices)


def check_key(rpc: tuple[str, str]) -> dict[str, Any]:
    """The tracker's entry for the key of ``rpc`` = (tracker, key); an :class:`InputError` that
    names the key and lists the keys there when it has no device with that key."""
    tracker, key = Tracker.parse(rpc[0]), rpc[1]
    devices = list_devices(tracker)
    for d in devices:
        if d["key"] == key:
            return d
    raise InputError(f"the RPC tracker at {tracker} has no device with key '{key}' (keys there: {_describe(devices)})")


@dataclass
class Session:
    """An RPC session with one device (``rpc`` is TVM's ``RPCSession``)."""

    rpc: Any
    key: str
    server: str  # host:port of the device's RPC server
    tracker: Tracker

    def where(self) -> str:
        return f"device {self.server} (key '{self.key}' at tracker {self.tracker})"


def _request(tracker: Tracker, key: str, wait_s: float) -> tuple[str, int, str]:
    """(host, port, match key) of a free device of ``key``, waiting at most ``wait_s`` seconds."""
    sock = _connect_tracker(tracker)
    try:
        _send(sock, [_REQUEST, key, "", 1])  # user "", priority 1 (TVM's defaults)
        sock.settimeout(wait_s)
        reply = _recv(sock)
    except TimeoutError:
        # Closing the connection drops the request: the tracker then skips it when a device frees.
        state = next((d for d in list_devices(tracker) if d["key"] == key), None)
        have = (
            f"{state['devices']} device(s), {state['free']} free, {state['pending']} request(s) waiting"
            if state
            else "no device registered"
        )
        raise DeviceError(
            f"no free device with key '{key}' at tracker {tracker} within {wait_s:g} s ({have}); "
            "wait longer with --rpc-timeout, or free a device"
        ) from None
    except (OSError, ValueError) as e:
        raise DeviceError(f"the RPC tracker at {tracker} dropped the request for key '{key}' ({e})") from None
    finally:
        sock.close()
    if not isinstance(reply, list) or reply[0] != _SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker} refused the request for key '{key}': {reply!r}")
    host, port, match = reply[1]
    return str(host), int(port), str(match)


@contextmanager
def open_session(
    rpc: tuple[str, str], *, wait_s: float = DEFAULT_WAIT_S, session_timeout_s: int = SESSION_TIMEOUT_S
) -> Iterator[Session]:
    """A session with a free device of the key, from the tracker. Checks the key first (an
    :class:`InputError` naming what exists), then waits at most ``wait_s`` for a free device (a
    :class:`DeviceError` saying how many there are and how many are free)."""
    tracker, key = Tracker.parse(rpc[0]), rpc[1]
    check_key(rpc)
    _tvm()  # before the wait: a missing TVM is an error now, not after a device was handed out
    host, port, match = _request(tracker, key, wait_s)
    from tvm import rpc as tvm_rpc

    try:
        sess = tvm_rpc.connect(host, port, match, session_timeout=session_timeout_s)
    except Exception as e:  # noqa: BLE001 - TVM raises RuntimeError and its own error types
        raise DeviceError(
            f"device {host}:{port} (key '{key}' at tracker {tracker}) refused the session: {_short(e)}"
        ) from None
    session = Session(sess, key, f"{host}:{port}", tracker)
    try:
        yield session
    finally:
        # The server ends the session (and offers the device again) when the last handle goes;
        # handles caught in reference cycles (remote modules, functions) go only with a collection,
        # which would leave the device busy for an unbounded time: collect now.
        session.rpc = sess = None
        gc.collect()


def _short(e: BaseException) -> str:
    text = str(e).strip()
    lost = ("kShutdown", "Broken pipe", "Connection reset", "SockChannel", "connection reset")
    if any(s in text for s in lost):
        return "the connection was lost (its RPC server stopped or was killed)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the message after a traceback; keep the last meaningful line.
    return (lines[-1] if lines else type(e).__name__)[:300]


class RemoteArtifact:
    """A graphslim artifact (``compile``'s folder) uploaded to a device and loaded in a Relax VM
    there. Call it with feeds to get the outputs back; :meth:`time` times it on the device."""

    def __init__(self, session: Session, folder: str | Path, meta: dict[str, Any] | None = None):
        folder = Path(folder)
        self.session = session
        self.meta = meta if meta is not None else read_meta(folder)
        library = folder / self.meta["library"]
        tvm = _tvm()
        from tvm import relax

        from graphslim.backend.driver import artifact_library, artifact_params

        # the bytes whose sha256 matches the one recorded at compile time (never a swapped file)
        data = bytearray(artifact_library(folder, self.meta))
        self._call("uploading the library", session.rpc.upload, data, library.name)
        try:
            lib = session.rpc.load_module(library.name)
        except Exception as e:  # noqa: BLE001
            hint = (
                f" ({library.name} holds object files: the device links them with its own compiler; "
                "install gcc-aarch64-linux-gnu here to link an AArch64 model.so instead)"
                if library.suffix == ".tar"
                else ""
            )
            raise DeviceError(f"{session.where()} could not load {library.name}: {_short(e)}{hint}") from None
        self.device = session.rpc.cuda(0) if self.meta.get("target") == "cuda" else session.rpc.cpu(0)
        self.vm = self._call("creating the Relax VM", relax.VirtualMachine, lib, self.device)
        self._tvm = tvm
        # the weights, when they are outside the library: sent once, passed after the inputs
        self._params = [
            self._call("receiving the weights", tvm.runtime.tensor, v, self.device)
            for v in artifact_params(folder, self.meta)
        ]

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except GraphslimError:
            raise
        except Exception as e:  # noqa: BLE001 - RPC failures surface as TVM's error types
            raise DeviceError(f"{self.session.where()} failed while {what}: {_short(e)}") from None

    def set_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        values = []
        for info in self.meta["inputs"]:
            if info["name"] not in feeds:
                raise InputError(f"no data for the artifact's input '{info['name']}'")
            value = np.ascontiguousarray(feeds[info["name"]], dtype=info["dtype"])
            if list(value.shape) != list(info["shape"]):
                raise InputError(
                    f"input '{info['name']}' has shape {list(value.shape)}; the artifact was compiled "
                    f"for {info['shape']}"
                )
            values.append(value)
        remote = [self._call("receiving the inputs", self._tvm.runtime.tensor, v, self.device) for v in values]
        self._call("receiving the inputs", self.vm.set_input, "main", *remote, *self._params)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.set_inputs(feeds)
        self._call("running the model", self.vm.invoke_stateful, "main")
        out = self._call("returning the outputs", self.vm.get_outputs, "main")
        return [self._call("returning the outputs", o.numpy) for o in _flatten(out)]

    def time(self, warmup: int, repeat: int, max_seconds: float) -> list[float]:
        """Milliseconds of single runs of ``main`` on the inputs last set, timed on the device:
        ``warmup`` untimed runs (at least one), then ``repeat`` runs, fewer if they would take
        longer than ``max_seconds`` (at least 3)."""
        timer = self._call(
            "timing the model",
            self.vm.time_evaluator,
            "invoke_stateful",
            self.device,
            1,  # number: one call per result, so that the percentiles are of single runs
            max(1, warmup),
        )
        warm = list(self._call("warming up", timer, "main").results)
        # the fastest warm-up run: the first run of a fresh VM (allocation, thread-pool start) can
        # take 100x a steady one, and would cut the timed runs to a fraction of max_seconds
        estimate = float(min(warm)) if warm else 0.0
        runs = repeat if estimate <= 0 else max(min(3, repeat), min(repeat, int(max_seconds / estimate)))
        timer = self._call("timing the model", self.vm.time_evaluator, "invoke_stateful", self.device, 1, runs)
        return [s * 1e3 for s in self._call("timing the model", timer, "main").results]


def _tvm() -> Any:
    from graphslim.backend.driver import require_tvm

    return require_tvm()


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, tuple | list):
        return [x for o in out for x in _flatten(o)]
    return [out]


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``artifact.json`` with every field checked, as for a local run
    (:func:`graphslim.backend.driver.artifact_meta`)."""
    from graphslim.backend.driver import artifact_meta

    return artifact_meta(folder)


def _feeds(meta: dict[str, Any], data: Any) -> dict[str, np.ndarray]:
    """One batch of the artifact's static batch size from ``data`` (samples repeat if there are
    fewer)."""
    batch = int(meta["batch"])
    head = data.take(batch)
    idx = np.arange(batch) % len(head)
    return {k: v[idx] for k, v in head.inputs.items()}


def _on_a_device(rpc: tuple[str, str], wait_s: float, work: Any, what: str) -> tuple[Any, bool]:
    """``work(session)`` on a device of the key; when that device stops answering, once more on
    another one. Returns (result, whether it was retried). Errors that are not the device's
    (an unknown key, bad inputs) are raised as they are; a second failure is one
    :class:`DeviceError` that gives both."""
    first: DeviceError | None = None
    for _ in range(ATTEMPTS):
        try:
            with open_session(rpc, wait_s=wait_s) as session:
                return work(session), first is not None
        except GraphslimError as e:
            if first is None and not isinstance(e, DeviceError):
                raise
            if first is not None:
                raise DeviceError(f"{first}; {what} again on another device of key '{rpc[1]}' failed: {e}") from None
            first = e
            log.warning("%s; %s again on another device of key '%s'", e, what, rpc[1])
    assert first is not None
    raise first


def measure_artifact(
    folder: str | Path,
    rpc: tuple[str, str],
    data: Any,
    *,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 5.0,
    max_devices: int | None = None,
    wait_s: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """Latency of the artifact in ``folder`` on devices of key ``rpc[1]``: the timed runs are
    split over the key's free devices (at most ``max_devices``), which time their shares in
    parallel (each for at most ``max_seconds``); a device that stops answering has its share
    timed again on another device of the key (once). Returns the statistics of all single runs
    together (``median_ms``, ``p90_ms``, ``p99_ms``, ``runs``, ``batch``, ``throughput_per_s``)
    with ``key``, ``tracker``, ``target``, ``devices`` (per share: the ``server`` that timed it,
    ``runs``, ``median_ms``) and ``retries`` (shares timed again)."""
    meta = read_meta(folder)
    entry = check_key(rpc)
    feeds = _feeds(meta, data)
    n = max(1, min(entry["free"], max_devices or entry["devices"], repeat))
    shares = [repeat // n + (1 if i < repeat % n else 0) for i in range(n)]
    results: list[tuple[dict[str, Any], bool] | None] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def share(i: int) -> None:
        def work(session: Session) -> dict[str, Any]:
            art = RemoteArtifact(session, folder, meta)
            art.set_inputs(feeds)
            return {"server": session.server, "times": art.time(warmup, shares[i], max_seconds)}

        try:
            results[i] = _on_a_device(rpc, wait_s, work, "timing its share")
        except BaseException as e:  # noqa: BLE001 - raised in the calling thread
            errors[i] = e

    threads = [threading.Thread(target=share, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    done = [res[0] for res in results if res is not None]
    times = [t for r in done for t in r["times"]]
    return {
        "key": rpc[1],
        "tracker": str(Tracker.parse(rpc[0])),
        "target": meta.get("target"),
        **summarize_times(times, int(meta["batch"])),
        "devices": [
            {"server": r["server"], "runs": len(r["times"]), "median_ms": round(float(np.median(r["times"])), 4)}
            for r in done
        ],
        "retries": sum(1 for r in results if r is not None and r[1]),
    }


def run_artifact(
    folder: str | Path,
    rpc: tuple[str, str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    wait_s: float = DEFAULT_WAIT_S,
) -> list[list[np.ndarray]]:
    """The artifact's outputs for each batch of feeds (whole static batches), computed on one
    device of the key; when the device stops answering, the remaining batches run on another
    device of the key (once)."""
    meta = read_meta(folder)
    todo = list(batches)
    outs: list[list[np.ndarray]] = []

    def work(session: Session) -> list[list[np.ndarray]]:
        art = RemoteArtifact(session, folder, meta)
        while len(outs) < len(todo):  # resumes where a lost device stopped
            outs.append(art(todo[len(outs)]))
        return outs

    return _on_a_device(rpc, wait_s, work, "running the remaining batches")[0]


def measure_model(
    model: Any,
    options: Any,
    data: Any,
    *,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 5.0,
) -> dict[str, Any]:
    """Build an ONNX model for ``options.target`` here (``options``: a
    :class:`~graphslim.backend.options.CompileOptions` with ``rpc`` set) and time it on a device of
    ``options.rpc``: :func:`measure_artifact`'s figures. A latency source for callers that hold
    a model rather than an artifact (``bench``, the search)."""
    from graphslim.backend.driver import build

    if options.rpc is None or not options.target:
        raise InputError("measuring on a device needs a target and --rpc-tracker HOST:PORT --rpc-key KEY")
    export, _ = build(
        model,
        options.target,
        batch=options.batch,
        shapes={k: list(v) for k, v in options.shapes} or None,
        tune=options.tune,
        tuning_db=options.tuning_db,
        rpc=options.rpc,
    )
    with tempfile.TemporaryDirectory(prefix="graphslim-device-") as tmp:
        export(Path(tmp))
        return measure_artifact(
            tmp,
            options.rpc,
            data,
            warmup=warmup,
            repeat=repeat,
            max_seconds=max_seconds,
            wait_s=options.rpc_timeout,
        )
