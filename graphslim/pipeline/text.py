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
from graphslim.pipeline.options import coerce_options, parse_pipeline_text
from graphslim.pipeline.registry import get_pass

__all__ = ["Pipeline"]


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
            text = p.read_text()
        except OSError as e:
            raise PipelineError(f"{p}: cannot read recipe ({e.strerror})") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                doc = yaml.safe_load(text)
            else:
                doc = json.loads(text)
        except Exception as e:  # noqa: BLE001 - json and yaml raise their own error types
            raise PipelineError(f"{p}: not a valid recipe ({type(e).__name__}: {str(e).splitlines()[0]})") from None
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
