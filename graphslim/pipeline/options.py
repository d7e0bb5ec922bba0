"""Pipeline text and option values: the lexer, option coercion into a pass's frozen Options
dataclass, and printing that round-trips.

Text form (MLIR style): ``fold-batchnorm,prune-channels{ratio=0.5,criterion=l1},quantize-int8``.
Option values are numbers, ``true``/``false``/``none``, bare or quoted strings, and ``[lists]``.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any, Literal

from graphslim.core.errors import PipelineError

__all__ = [
    "MAX_INT",
    "coerce_options",
    "format_options",
    "format_value",
    "parse_layer_values",
    "parse_pipeline_text",
    "show",
]

#: Integer options are bounded (ranks, epochs, channel counts...): a bigger value is a typo or an attack.
MAX_INT = 2**31 - 1

_MAX_DEPTH = 16  # of [lists] in pipeline text

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A value as error messages echo it: its repr, cut short (a recipe value may be a YAML alias
    bomb whose full repr runs to hundreds of MB)."""
    return _REPR.repr(value)


# --------------------------------------------------------------------------- text parsing


class _Lexer:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, msg: str) -> PipelineError:
        near = self.s[max(0, self.i - 20) : self.i + 20]
        return PipelineError(f"bad pipeline text at column {self.i + 1}: {msg} (near '{near}')")

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def eat(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.i += 1

    def name(self) -> str:
        self.skip_ws()
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "-_."):
            self.i += 1
        if start == self.i:
            raise self.error("expected a name")
        return self.s[start : self.i]

    def value(self, depth: int = 0) -> Any:
        ch = self.peek()
        if ch == "[":
            if depth >= _MAX_DEPTH:
                raise self.error(f"lists nested more than {_MAX_DEPTH} deep")
            self.i += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.i += 1
                return items
            while True:
                items.append(self.value(depth + 1))
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.eat("]")
                return items
        if ch in "\"'":
            return _Quoted(self.quoted(ch))
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ",{}[]=":
            self.i += 1
        raw = self.s[start : self.i].strip()
        if not raw:
            raise self.error("expected a value")
        return raw

    def quoted(self, q: str) -> str:
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                out.append(self.s[self.i + 1])
                self.i += 2
                continue
            if c == q:
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        raise self.error("unterminated quoted string")


class _Quoted(str):
    """A string value that was quoted in the text: never coerced to a number or bool."""


def parse_pipeline_text(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Split pipeline text into (pass name, raw option dict) items, without checking names."""
    lx = _Lexer(text)
    items: list[tuple[str, dict[str, Any]]] = []
    if not lx.peek():
        return items
    while True:
        name = lx.name()
        opts: dict[str, Any] = {}
        if lx.peek() == "{":
            lx.i += 1
            if lx.peek() != "}":
                while True:
                    key = lx.name()
                    if key in opts:
                        raise lx.error(f"option '{key}' given twice")
                    lx.eat("=")
                    opts[key] = lx.value()
                    if lx.peek() == ",":
                        lx.i += 1
                        continue
                    break
            lx.eat("}")
        items.append((name, opts))
        if not lx.peek():
            return items
        lx.eat(",")


# --------------------------------------------------------------------------- option coercion


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and not isinstance(value, _Quoted) and value in ("none", "None")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except PipelineError as e:
                errors.append(str(e))
        raise PipelineError(errors[0] if errors else f"{where}: bad value {show(value)}")
    if origin is Literal:
        s = str(value)
        if s not in [str(a) for a in args]:
            raise PipelineError(f"{where}: {show(value)} is not one of {', '.join(map(str, args))}")
        return s
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            value = [value]  # a single bare value where a list is expected
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise PipelineError(f"{where}: expected true or false, got {show(value)}")
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, list | tuple | dict):
            raise PipelineError(f"{where}: expected a string, got {show(value)}")
        return str(value)
    raise PipelineError(f"{where}: unsupported option type {tp}")


def _coerce_int(value: Any, where: str) -> int:
    """An integer option: an int, or a number or string with an integral value, within MAX_INT."""
    if isinstance(value, bool):
        raise PipelineError(f"{where}: expected an integer, got {show(value)}")
    if isinstance(value, int):
        n = value
    else:
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise PipelineError(f"{where}: expected an integer, got {show(value)}") from None
        if not f.is_integer():
            raise PipelineError(f"{where}: expected an integer, got {show(value)}")
        n = int(f)
    if abs(n) > MAX_INT:
        raise PipelineError(f"{where}: {show(value)} is out of range (at most {MAX_INT:,} in size)")
    return n


def _coerce_float(value: Any, where: str) -> float:
    """A float option: any finite number (bools refused)."""
    if isinstance(value, bool):
        raise PipelineError(f"{where}: expected a number, got {show(value)}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise PipelineError(f"{where}: expected a number, got {show(value)}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise PipelineError(f"{where}: expected a finite number, got {show(value)}")
    return f


def coerce_options(pass_name: str, options_cls: type, raw: dict[str, Any]) -> Any:
    """Build the pass's frozen Options dataclass from raw values; errors list the valid options."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "(none)"
            raise PipelineError(f"pass '{pass_name}' has no option {show(key)} (options: {valid})")
        kwargs[key] = _coerce(value, hints[key], f"{pass_name}{{{key}}}")
    try:
        return options_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"pass '{pass_name}': {e}") from None


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple | list):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if v is None:
        return "none"
    s = str(v)
    if isinstance(v, str) and (
        not s or any(c in s for c in ",{}[]=\"' ") or s.lower() in ("true", "false", "none") or _looks_numeric(s)
    ):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def format_options(options: Any) -> str:
    """``{k=v,...}`` for the options that differ from their defaults, or '' if none do."""
    parts = []
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        )
        if v != default:
            parts.append(f"{f.name}={format_value(v)}")
    return "{" + ",".join(parts) + "}" if parts else ""


def parse_layer_values(
    option: str, items: tuple[str, ...], *, low: float, high: float, high_inclusive: bool = False
) -> dict[str, float]:
    """Per-layer option values written ``"NAME=VALUE"`` (``layer_ratios=["conv2=0.3","fc1=0.5"]``):
    a name -> value mapping; a ValueError naming the option for a malformed item, a value outside
    [low, high) (or [low, high] with ``high_inclusive``) or a name given twice. The value follows the
    last '=', so node names may contain one."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = str(item).rpartition("=")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not sep or not name or value != value:
            raise ValueError(f'{option}: expected "NAME=VALUE" items, got {item!r}')
        if not (low <= value <= high if high_inclusive else low <= value < high):
            bound = "]" if high_inclusive else ")"
            raise ValueError(f"{option}: {name}={raw} is outside [{low:g}, {high:g}{bound}")
        if name in out:
            raise ValueError(f"{option}: layer {name!r} given twice")
        out[name] = value
    return out
