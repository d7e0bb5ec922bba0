"""Pipelines: an ordered list of configured passes, parsed from text or a recipe file, printed back
to the text it parses from (``Pipeline.parse(str(p)) == p``).

A recipe is JSON or YAML: a list (or ``{"passes": [...]}``) whose items are a pass name, or
``{"name": NAME, "options": {...}}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from graphslim.core.errors import PipelineError
from graphslim.pipeline.options import MAX_INT, coerce_options, parse_pipeline_text
from graphslim.pipeline.registry import get_pass

__all__ = ["MAX_RECIPE_BYTES", "Pipeline"]

#: Limits on a recipe, checked before any of it is used: a real recipe is a few lines.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 10_000  # every value counted each time it is reached (YAML aliases included)
MAX_RECIPE_DEPTH = 32


def _check_size(p: Path, doc: Any) -> None:
    """Refuse recipes too big or too deep to be real, before anything walks them: YAML aliases
    let a 1 KB file describe 10^9 values (an 'alias bomb'), and every later step (coercion, error
    messages) would expand them. Integers must fit options (at most MAX_INT in size)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise PipelineError(f"{p}: more than {MAX_RECIPE_VALUES:,} values (YAML aliases count each use); refused")
        if depth > MAX_RECIPE_DEPTH:
            raise PipelineError(f"{p}: nested more than {MAX_RECIPE_DEPTH} levels deep; refused")
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple | set):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            digits = len(str(abs(value))) if abs(value) < 10**4000 else "thousands of"
            raise PipelineError(f"{p}: an integer with {digits} digits; options take at most {MAX_INT:,}")


# --------------------------------------------------------------------------- pipelines


class Pipeline(Sequence):
    """An ordered list of configured passes. ``str()`` gives the normalized text."""

    def __init__(self, passes: Sequence[Any] = ()):
        self.passes = list(passes)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        passes = []
        for name, raw in parse_pipeline_text(text):
            pass_cls = get_pass(name)
            passes.append(pass_cls(coerce_options(name, pass_cls.Options, raw)))
        return cls(passes)

    @classmethod
    def from_recipe(cls, path: str | Path) -> Pipeline:
        p = Path(path)
        try:
            if p.stat().st_size > MAX_RECIPE_BYTES:
                raise PipelineError(f"{p}: a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB; this one is larger")
            raw = p.read_bytes()
        except OSError as e:
            raise PipelineError(f"{p}: cannot read recipe ({e.strerror})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(
                f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the recipe as UTF-8"
            ) from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                doc = yaml.safe_load(text)
            else:
                doc = json.loads(text)
        except RecursionError:
            raise PipelineError(f"{p}: not a valid recipe (nested too deeply)") from None
        except Exception as e:  # noqa: BLE001 - json and yaml raise their own error types
            first = str(e).splitlines()[0][:200] if str(e).strip() else ""
            raise PipelineError(f"{p}: not a valid recipe ({type(e).__name__}: {first})") from None
        _check_size(p, doc)
        if isinstance(doc, dict):
            doc = doc.get("passes")
        if not isinstance(doc, list):
            raise PipelineError(f'{p}: a recipe is a list of passes (or {{"passes": [...]}})')
        passes = []
        for i, item in enumerate(doc):
            if isinstance(item, str):
                name, raw = item, {}
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                name, raw = item["name"], item.get("options") or {}
                extra = set(item) - {"name", "options"}
                if extra or not isinstance(raw, dict):
                    raise PipelineError(f"{p}: item {i}: expected keys 'name' and 'options' (a mapping)")
            else:
                raise PipelineError(f"{p}: item {i}: expected a pass name or {{name, options}}")
            pass_cls = get_pass(name)
            passes.append(pass_cls(coerce_options(name, pass_cls.Options, raw)))
        return cls(passes)

    def to_recipe(self) -> list[dict[str, Any]]:
        out = []
        for p in self.passes:
            opts = {f.name: getattr(p.options, f.name) for f in dataclasses.fields(p.options)}
            out.append(
                {"name": p.name, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
            )
        return out

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and [(p.name, p.options) for p in self.passes] == [
            (p.name, p.options) for p in other.passes
        ]

    def __hash__(self) -> int:
        return hash(str(self))

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, i):  # type: ignore[override]
        return self.passes[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.passes)
