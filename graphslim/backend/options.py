"""How to compile: the target, the shapes to specialize to, tuning, threads and the remote device
(one frozen object that ``compile``, ``optimize --target`` and ``bench`` share)."""

from __future__ import annotations

from dataclasses import dataclass

from graphslim.core.errors import InputError

__all__ = ["CompileOptions", "parse_shapes"]


@dataclass(frozen=True)
class CompileOptions:
    """How to compile with TVM (``compile``, ``optimize --target``)."""

    target: str | None = None
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # symbolic dims bound per input, e.g. input_ids=1x128
    batch: int | None = None  # leading symbolic dims; default: what shapes give, else 1
    tune: int = 0
    tuning_db: str | None = None
    rpc: tuple[str, str] | None = None  # (tracker host:port, device key): tune, run and time on that device
    rpc_timeout: float = 60.0  # seconds to wait for a free device of the key
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise InputError("--batch must be >= 1")
        if self.tune < 0:
            raise InputError("--tune must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be >= 1")
        if self.rpc is not None:
            if not isinstance(self.rpc, tuple | list) or len(self.rpc) != 2:
                raise InputError(f"rpc: expected (tracker 'host:port', device key), got {self.rpc!r}")
            object.__setattr__(self, "rpc", (str(self.rpc[0]), str(self.rpc[1])))  # a list from JSON too
            tracker, key = self.rpc
            if not key or not str(key).strip():
                raise InputError("--rpc-key: give the device key the boards registered with")
            from graphslim.backend.remote import Tracker

            Tracker.parse(tracker)  # HOST:PORT, else one clear error
        if not self.rpc_timeout > 0:
            raise InputError("--rpc-timeout must be > 0")

    @property
    def shape_map(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)


def parse_shapes(items: list[str] | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``["input_ids=1x128", "pixel_values=1x3x224x224"]`` -> ((name, dims), ...); one clear error
    for anything else (the syntax is :func:`graphslim.kernels.prepare.parse_shape`'s)."""
    from graphslim.kernels.prepare import parse_shape

    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, dims = parse_shape(item)
        if name in out and out[name] != tuple(dims):
            raise InputError(f"--shape {name} given twice with different shapes")
        out[name] = tuple(dims)
    return tuple(out.items())
