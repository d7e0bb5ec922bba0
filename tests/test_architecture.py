"""The package's layers import one way, with no cycles and no private names across modules.

Layers, lowest first (a module may import its own layer and the layers below it):
core <- analysis <- transforms <- pipeline <- passes <- kernels <- backend <- report <- run <- cli.
``graphslim/__init__.py`` is the public API facade over all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["core", "analysis", "transforms", "pipeline", "passes", "kernels", "backend", "report", "run", "cli"]
# graphslim.passes and graphslim.kernels are installed from top-level folders.
SOURCES = {"passes": ROOT / "passes", "kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        folder = SOURCES.get(layer, ROOT / "graphslim" / layer)
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join(["graphslim", layer, *parts])] = f
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every graphslim import, also inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphslim"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("graphslim")]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


MODULES = _modules()


def test_every_module_is_in_a_layer():
    top = sorted(p.name for p in (ROOT / "graphslim").glob("*.py") if p.name != "__init__.py")
    assert top == [], f"modules outside the layers: {top}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str):
    mine = LAYERS.index(_layer(module))
    for target, names, line in _imports(MODULES[module]):
        if target == "graphslim":
            raise AssertionError(f"{module}:{line} imports the public facade 'graphslim' (import the layer instead)")
        layer = _layer(target)
        assert layer is not None, f"{module}:{line} imports {target}, which is in no layer"
        assert LAYERS.index(layer) <= mine, (
            f"{module}:{line} imports {target}: layer '{layer}' is above '{_layer(module)}'"
        )
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module}:{line} imports private names {private} from {target}"


def test_no_import_cycles():
    """Module-level imports form no cycle (imports inside functions are deferred and may close one
    only across layers, which the test above forbids)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphslim."):
                target = node.module
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
        graph[module] = {d for d in deps if d in MODULES and d != module}

    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d] if d in stack else [m, d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


MAX_BODY_LINES = 60


def _long_functions() -> list[str]:
    """'path:line name (N lines)' of every function whose body, docstring excluded, is over
    MAX_BODY_LINES lines and whose docstring gives no reason in a sentence starting "Long: "."""
    out = []
    for folder in ("graphslim", "passes", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                body = node.body[1:] if doc is not None and len(node.body) > 1 else node.body
                length = node.end_lineno - body[0].lineno + 1
                if length <= MAX_BODY_LINES:
                    continue
                sentences = " ".join((doc or "").split()).split(". ")
                if not any(s.startswith("Long: ") and len(s) > len("Long: ") + 10 for s in sentences):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_long_functions_say_why():
    """A function over MAX_BODY_LINES lines (docstring excluded) is split into named steps, or its
    docstring says why it reads best as one piece, in a sentence starting "Long: "."""
    offenders = _long_functions()
    assert not offenders, (
        f"{len(offenders)} functions over {MAX_BODY_LINES} lines without a 'Long: <reason>' sentence in "
        "their docstring (split them, or say why they read best as one piece):\n" + "\n".join(offenders)
    )
