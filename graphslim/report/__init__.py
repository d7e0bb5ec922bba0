"""Reports rendered from ``report.json`` (Markdown, self-contained HTML, plots) and its JSON Schema."""

from __future__ import annotations

from graphslim.report.render import (
    SCHEMA_PATH,
    compare_markdown,
    compare_plot,
    layer_rows,
    load_report,
    plots,
    render_files,
    render_html,
    render_markdown,
    summary_rows,
)

__all__ = [
    "SCHEMA_PATH",
    "compare_markdown",
    "compare_plot",
    "layer_rows",
    "load_report",
    "plots",
    "render_files",
    "render_html",
    "render_markdown",
    "summary_rows",
]
