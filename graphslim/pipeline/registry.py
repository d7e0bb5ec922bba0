"""Passes and their registry.

A pass is a class with a kebab-case ``name``, a docstring (what it does, what it refuses), a frozen
``Options`` dataclass with defaults, and ``run(graph, ctx) -> PassResult``. ``@register_pass``
puts it in the one registry; other packages add passes through the ``graphslim.passes``
entry-point group (an entry point names a module that registers passes, or a Pass class).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from graphslim.core.errors import PipelineError
from graphslim.core.ir import Graph
from graphslim.pipeline.options import coerce_options, format_options, show

if TYPE_CHECKING:
    from graphslim.pipeline.manager import PassContext

__all__ = ["ENTRY_POINT_GROUP", "Pass", "PassResult", "Skip", "get_pass", "register_pass", "registered_passes"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ENTRY_POINT_GROUP = "graphslim.passes"


@dataclass(frozen=True)
class Skip:
    """Part of the graph a pass left alone, and why (this reaches the report)."""

    where: str  # a node or group name
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason}


@dataclass
class PassResult:
    """What a pass returns: whether it changed the graph, its stats, what it left alone, and the
    analyses its changes did not invalidate (``preserves``: analysis functions, as LLVM's
    PreservedAnalyses; everything else cached for the graph is dropped when it changed)."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    preserves: tuple[Any, ...] = ()
    # Set when the pass could not do what it was asked at all (one line: why). The run goes on,
    # the report and stderr say so, and the CLI exits 4.
    not_run: str | None = None


class Pass:
    """Base class for passes. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    #: Exact passes must not change outputs; --verify holds them to ``PassContext.rtol``.
    exact: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("give options or keyword options, not both")
        if options is None:
            options = coerce_options(self.name, self.Options, kwargs)
        self.options = options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name + format_options(self.options)

    def __repr__(self) -> str:
        return f"<pass {self}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pass) and (self.name, self.options) == (other.name, other.options)

    def __hash__(self) -> int:
        return hash((self.name, str(self)))


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    name = cls.name
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"pass name {name!r} of {cls.__qualname__} is not kebab-case")
    if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__qualname__}.Options must be a frozen dataclass")
    for f in dataclasses.fields(cls.Options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__qualname__}.Options.{f.name} needs a default")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass '{name}' registered twice ({existing.__module__} and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_passes() -> None:
    """Load every ``graphslim.passes`` entry point (once). The built-in passes registered
    themselves when the ``graphslim`` package was imported (its ``__init__`` imports them), so this
    layer never imports the layer above it."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a broken plugin must not break (or exit) graphslim
            log.warning("cannot load pass plugin '%s' (%s): %s", ep.name, ep.value, e)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)


def registered_passes() -> dict[str, type[Pass]]:
    """All passes by name: the built-in ones and those of installed plugins."""
    _load_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; a :class:`PipelineError` listing the valid names if none is."""
    _load_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown pass {show(name)} (passes: {', '.join(sorted(_REGISTRY))})") from None
