"""How to compile: the target, the shapes to specialize to, tuning and threads (one frozen object
that ``compile``, ``optimize --target`` and ``bench`` share)."""

from __future__ import annotations

from dataclasses import dataclass

from graphslim.core.errors import InputError

__all__ = ["CompileOptions", "parse_shapes"]


@dataclass(frozen=True)
class CompileOptions:
    """How to compile with TVM (``compile``, ``optimize --target``)."""

    target: str | None = None
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # symbolic dims bound per input, e.g. input_ids=1x128
    batch: int = 1
    tune: int = 0
    tuning_db: str | None = None
    rpc: tuple[str, str] | None = None  # (tracker host:port, device key)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise InputError("--batch must be >= 1")
        if self.tune < 0:
            raise InputError("--tune must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be >= 1")

    @property
    def shape_map(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)


def parse_shapes(items: list[str] | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``["input_ids=1x128", "pixel_values=1x3x224x224"]`` -> ((name, dims), ...); one clear error
    for anything else."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise InputError(f"--shape: expected NAME=DIMS such as input_ids=1x128, got {item!r}")
        if name in out:
            raise InputError(f"--shape: input '{name}' given twice")
        out[name] = shape
    return tuple(out.items())
