"""Human-readable reports rendered from ``report.json``: Markdown, and self-contained HTML with plots.

Everything here reads the report dictionary only, so ``graphslim report OUT_DIR`` re-renders a run
and ``graphslim compare`` puts several runs side by side without the models. Plots use matplotlib
with the Agg backend and are embedded in the HTML as base64 PNGs; the Markdown links the same
PNGs when they are written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_PATH",
    "compare_markdown",
    "compare_plot",
    "finite_json",
    "layer_rows",
    "load_report",
    "plots",
    "render_files",
    "render_html",
    "render_markdown",
    "search_rows",
    "summary_rows",
]

SCHEMA_PATH = Path(__file__).with_name("schema.json")
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def load_report(folder: str | Path) -> dict[str, Any]:
    from graphslim.core.errors import InputError

    p = Path(folder) / "report.json" if Path(folder).is_dir() else Path(folder)
    try:
        rep = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read a graphslim report ({e})") from None
    if not isinstance(rep, dict) or "schema_version" not in rep or "before" not in rep:
        raise InputError(f"{p}: not a graphslim report.json")
    return rep


# --------------------------------------------------------------------------- tables


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    b, a, c = report["before"], report["after"], report["compression"]
    rows = [
        ("parameters", _fmt(b["params"]), _fmt(a["params"]), _fmt(c["r_params"])),
        ("MACs", _fmt(b["macs"]), _fmt(a["macs"]), _fmt(c["r_macs"])),
        ("size on disk (bytes)", _fmt(b["size_bytes"]), _fmt(a["size_bytes"]), _fmt(c["r_bytes"])),
        ("weight sparsity", f"{b['sparsity']:.2%}", f"{a['sparsity']:.2%}", ""),
        ("nodes", _fmt(b["nodes"]), _fmt(a["nodes"]), ""),
    ]
    acc = report.get("accuracy")
    if acc:
        rows.append(
            (
                f"top-1 accuracy ({acc['samples']} samples)",
                f"{acc['before']:.4f}",
                f"{acc['after']:.4f}",
                f"{-acc['drop_points']:+.2f} points",
            )
        )
    met = report.get("metric")
    if met and met["name"] != "accuracy":
        rows.append(
            (
                f"{met['name']} to the original ({met['samples']} samples, {met['on']})",
                f"{met['before']:.4f}",
                f"{met['after']:.4f}",
                f"{-met['drop_points']:+.2f} points",
            )
        )
    rows += _latency_rows(report)
    return rows


def _latency_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The summary's latency rows: ONNX Runtime before and after, TVM compiled, the device."""
    lat = report.get("latency")
    if not lat:
        return []
    rows = []
    o, n = lat["ort_original"], lat["ort_compressed"]
    rows.append(
        (
            f"ONNX Runtime latency, batch {o['batch']} (median ms)",
            f"{o['median_ms']:.4g}",
            f"{n['median_ms']:.4g}",
            f"{n['median_ms'] / o['median_ms']:.2f}x" if o["median_ms"] else "",
        )
    )
    t = lat.get("tvm_compiled")
    if t:
        target = (report.get("compiled") or {}).get("target", "")
        rows.append(
            (
                f"TVM compiled ({target}), batch {t['batch']} (median ms)",
                "",
                f"{t['median_ms']:.4g}",
                f"{t['median_ms'] / o['median_ms']:.2f}x vs ORT original" if o["median_ms"] else "",
            )
        )
    d = lat.get("device")
    if d:
        # Timed on the device (a board of the tracker), so the ratio compares two machines
        # when the device is not this one.
        servers = ", ".join(x["server"] for x in d.get("devices", []))
        rows.append(
            (
                f"device '{d['key']}' ({d.get('target') or ''}; {servers} via tracker {d['tracker']}), "
                f"batch {d['batch']} (median ms, {d['runs']} runs)",
                "",
                f"{d['median_ms']:.4g}",
                f"{d['median_ms'] / o['median_ms']:.2f}x vs ORT original here" if o["median_ms"] else "",
            )
        )
    return rows


def _channels(layer: dict[str, Any]) -> Any:
    shp = layer.get("output_shape") or []
    return shp[1] if len(shp) > 1 and layer["op"] in ("Conv", "ConvTranspose") else (shp[-1] if shp else None)


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per weight layer of the original: channels, parameters, sparsity, rank, precision after."""
    after = {lay["name"]: lay for lay in report["after"].get("layers", [])}
    ranks = {}
    for p in report["passes"]:
        for lay in p["stats"].get("layers", []) if isinstance(p["stats"].get("layers"), list) else []:
            if "rank" in lay:
                ranks[lay["name"]] = lay["rank"]
    rows = []
    for lay in report["before"].get("layers", []):
        if lay["op"] not in _WEIGHT_OPS:
            continue
        new = after.get(lay["name"])
        partners = [v for k, v in after.items() if k.startswith(lay["name"] + "_") and v["op"] in _WEIGHT_OPS]
        params_after = None
        if new is not None:
            params_after = (new.get("weight_params", 0) or 0) + sum(p.get("weight_params", 0) or 0 for p in partners)
        rows.append(
            {
                "name": lay["name"],
                "op": lay["op"],
                "channels_before": _channels(lay),
                "channels_after": _channels(new) if new else None,
                "params_before": lay.get("weight_params", lay["params"]),
                "params_after": params_after,
                "sparsity_after": new["sparsity"]
                if new and str(new.get("precision", "")).startswith("float")
                else None,
                "rank": ranks.get(lay["name"]),
                "precision_after": new.get("precision") if new else "removed",
            }
        )
    return rows


# --------------------------------------------------------------------------- plots


def plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: per-layer parameters, accuracy vs compression, latency. Empty if matplotlib is
    missing (the tables still render)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return {}
    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    rows = layer_rows(report)
    if rows:
        save(_layers_figure(plt, rows), "layers.png")
    points = _accuracy_points(report)
    if points:
        save(_accuracy_figure(plt, report, points), "accuracy.png")
    if report.get("search"):
        fig = _pareto_figure(plt, report["search"])
        if fig is not None:
            save(fig, "pareto.png")
    lat = report.get("latency")
    if lat:
        save(_latency_figure(plt, lat), "latency.png")
    return out


_OBJECTIVE_LABEL = {"latency": "latency (ms)", "bytes": "bytes on disk", "macs": "MACs"}


def _objective_value(sec: dict[str, Any], row: dict[str, Any]) -> Any:
    return row["latency_ms"] if sec["objective"] == "latency" else row[sec["objective"]]


def _layers_figure(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Bars of each weight layer's parameters before and after."""
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    names = [r["name"] for r in rows][::-1]
    before = [r["params_before"] or 0 for r in rows][::-1]
    after = [r["params_after"] or 0 for r in rows][::-1]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], before, height=0.4, label="before", color="#9aa5b1")
    ax.barh([i - 0.2 for i in y], after, height=0.4, label="after", color="#2f6fb0")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.set_xlabel("weight parameters")
    ax.set_title("Parameters per layer")
    ax.legend()
    return fig


def _accuracy_figure(plt: Any, report: dict[str, Any], points: list[Any]) -> Any:
    """The metric against the compression ratio, one point per step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys, labels = zip(*points, strict=True)
    ax.plot(xs, ys, "o-", color="#2f6fb0")
    for x, yv, label in points:
        ax.annotate(label, (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("compression ratio r (parameters kept)")
    ax.set_ylabel(_metric_name(report))
    ax.set_title("Accuracy vs compression")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    return fig


def _latency_figure(plt: Any, lat: dict[str, Any]) -> Any:
    """Median latency bars: ONNX Runtime before and after, TVM compiled, the device."""
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = ["ORT original", "ORT compressed"]
    vals = [lat["ort_original"]["median_ms"], lat["ort_compressed"]["median_ms"]]
    if lat.get("tvm_compiled"):
        labels.append("TVM compiled")
        vals.append(lat["tvm_compiled"]["median_ms"])
    if lat.get("device"):
        labels.append(f"device '{lat['device']['key']}'")
        vals.append(lat["device"]["median_ms"])
    ax.bar(labels, vals, color=["#9aa5b1", "#2f6fb0", "#3e8e5e", "#b0662f"][: len(vals)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3g} ms", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"median ms, batch {lat['ort_original']['batch']}")
    ax.set_title("Latency")
    return fig


def _pareto_figure(plt: Any, sec: dict[str, Any]) -> Any:
    """Every trial (objective vs metric), the Pareto front, the budget and the chosen model."""
    hist = [h for h in sec.get("history", []) if h[3] is not None]
    if not hist and not sec["front"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [h for h in hist if h[4]]
    bad = [h for h in hist if not h[4]]
    if bad:
        ax.scatter([h[3] for h in bad], [h[1] for h in bad], s=14, color="#d0d5dd", label="trials over the budget")
    if ok:
        ax.scatter([h[3] for h in ok], [h[1] for h in ok], s=14, color="#9aa5b1", label="trials within the budget")
    front = [r for r in sec["front"] if _objective_value(sec, r) is not None]
    front.sort(key=lambda r: _objective_value(sec, r))
    if front:
        ax.plot(
            [_objective_value(sec, r) for r in front],
            [r["accuracy"] for r in front],
            "o-",
            color="#2f6fb0",
            label="Pareto front",
        )
        measured = [r for r in front if r.get("latency_source") == "measured"]
        if sec["objective"] == "latency" and measured:
            ax.plot(
                [_objective_value(sec, r) for r in measured],
                [r["accuracy"] for r in measured],
                "s",
                ms=10,
                mfc="none",
                color="#2f6fb0",
                label="latency measured end to end (others: estimates)",
            )
    ref = sec["metric"]["reference"]
    ax.axhline(ref, color="#3e8e5e", lw=0.8, ls=":", label="original")
    ax.axhline(ref - sec["max_accuracy_drop"] / 100, color="#b42318", lw=0.8, ls="--", label="budget")
    chosen = sec["chosen"]
    if _objective_value(sec, chosen) is not None:
        ax.plot([_objective_value(sec, chosen)], [chosen["accuracy"]], "*", ms=14, color="#b42318", label="chosen")
    ax.set_xlabel(_OBJECTIVE_LABEL[sec["objective"]] + (f", {sec['runtime']}" if sec["objective"] == "latency" else ""))
    ax.set_ylabel(sec["metric"].get("description") or sec["metric"]["name"])
    # Far-off trials would flatten the interesting part: show the band around the budget.
    low = ref - max(3 * sec["max_accuracy_drop"], 2.0) / 100
    hidden = sum(1 for h in hist if h[1] < low)
    ax.set_ylim(bottom=low)
    ax.set_title(f"Search: {sec['trials']} trials" + (f" ({hidden} below the plotted range)" if hidden else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def search_rows(report: dict[str, Any]) -> list[list[str]]:
    """The search's Pareto front as table rows (trial, metric, points lost, bytes, MACs, latency)."""
    sec = report.get("search") or {}
    rows = []
    for r in sec.get("front", []):
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.4g} ({r['latency_source']})"
        rows.append(
            [
                "original" if r["trial"] is None else str(r["trial"]),
                f"{r['accuracy']:.4f}",
                _fmt(r["drop_points"]),
                _fmt(r["bytes"]),
                _fmt(r["macs"]),
                lat,
                "yes" if r["within_budget"] else "no",
                r["pipeline"],
            ]
        )
    return rows


_SEARCH_HEADER = ["trial", "metric", "points lost", "bytes", "MACs", "latency ms", "within budget", "pipeline"]


def _search_summary(sec: dict[str, Any]) -> str:
    c = sec["chosen"]
    return (
        f"{sec['trials']} trials ({sec['evaluations']} evaluated, {sec['sensitivity']['evaluations']} one-knob "
        f"sensitivity candidates), objective {sec['objective']} on {sec['runtime']}, metric {sec['metric'].get('description') or sec['metric']['name']} "
        f"on {sec['metric']['samples']} held-out samples (original {sec['metric']['reference']:.4f}), budget "
        f"{sec['max_accuracy_drop']} points. Chosen: "
        + ("the original" if c["trial"] is None else f"trial {c['trial']}")
        + f" ({c.get('why', '')}). Latencies marked 'estimate' come from the per-layer table; 'measured' ones "
        "were timed end to end, interleaved with the original."
    )


def _metric_name(report: dict[str, Any]) -> str:
    for p in report["passes"]:
        if p["name"] == "spiral" and p["stats"].get("metric") in ("teacher_agreement", "agreement"):
            return "top-1 agreement with the original"
        if p["name"] == "spiral" and p["stats"].get("metric"):
            return str(p["stats"]["metric"]).replace("_", " ")
    if report.get("accuracy"):
        return "top-1 accuracy"
    met = report.get("metric")
    if met:
        return f"{met['name'].replace('_', ' ')} to the original"
    return "top-1 agreement with the original"


def _accuracy_points(report: dict[str, Any]) -> list[tuple[float, float, str]]:
    """The points of the accuracy plot; those whose r is undefined (a model without parameters)
    or whose metric is unknown are left out."""
    return [p for p in _all_accuracy_points(report) if p[0] is not None and p[1] is not None]


def _all_accuracy_points(report: dict[str, Any]) -> list[tuple[Any, Any, str]]:
    for p in report["passes"]:
        curve = p["stats"].get("curve") if p["name"] == "spiral" else None
        if curve:
            key = p["stats"]["metric"]
            return [
                (c["r_params"], c[key], f"step {c['step']}" + (" (rolled back)" if c.get("rolled_back") else ""))
                for c in curve
            ]
    acc = report.get("accuracy") or report.get("metric")
    if acc:
        return [(1.0, acc["before"], "original"), (report["compression"]["r_params"], acc["after"], "result")]
    fid = report.get("fidelity") or {}
    if fid.get("top1_agreement") is not None:
        return [(1.0, 1.0, "original"), (report["compression"]["r_params"], fid["top1_agreement"], "result")]
    return []


# --------------------------------------------------------------------------- Markdown and HTML


def render_markdown(report: dict[str, Any], images: dict[str, bytes] | None = None) -> str:
    """report.md: the run's summary, passes, layers and plots as Markdown.

    Long: it writes the document top to bottom, one section after another, so the code reads in
    the order of the page it produces."""
    lines = [
        "# graphslim report",
        "",
        f"- input: `{report['input']['path']}` (sha256 {report['input']['sha256'][:12]}, opset {report['input']['opset']})",
        f"- pipeline: `{report['pipeline']}`",
        f"- graphslim {report['versions']['graphslim']}, onnxruntime {report['versions']['onnxruntime']}",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    if report["compression"].get("r_params") is None:
        lines += ["", "r (parameters after / before) is undefined: the original model has no parameters."]
    fid = report.get("fidelity")
    if fid and "error" not in fid:
        lines += [
            "",
            f"Fidelity to the original on {fid['samples']} samples ({fid['on']}): max abs diff "
            f"{fid['max_abs_diff']:.3g}, cosine {fid['cosine']:.6f}, top-1 agreement {_fmt(fid['top1_agreement'])}.",
        ]
        if fid.get("nonfinite"):
            lines.append(f"**{fid['nonfinite']:,} output values are NaN or Inf where the original's are not.**")
    for nr in report.get("not_run") or []:
        lines.append(f"- **{nr['pass']} did not run**: {nr['reason']}")
    for name, b in (report.get("budgets") or {}).items():
        lines.append(
            f"- budget `{name}`: {b['measure']} = {_fmt(b['value'])}, limit {_fmt(b['limit'])}: "
            f"**{'met' if b['met'] else 'MISSED'}**"
        )
    rows = layer_rows(report)
    if rows:
        lines += [
            "",
            "## Layers",
            "",
            "| layer | op | channels | weight params | sparsity | rank | precision |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            sparsity = "-" if r["sparsity_after"] is None else f"{r['sparsity_after']:.0%}"
            lines.append(
                f"| {r['name']} | {r['op']} | {_fmt(r['channels_before'])} → {_fmt(r['channels_after'])} | "
                f"{_fmt(r['params_before'])} → {_fmt(r['params_after'])} | {sparsity} | "
                f"{_fmt(r['rank'])} | {r['precision_after'] or '-'} |"
            )
    sec = report.get("search")
    if sec:
        lines += ["", "## Search", "", _search_summary(sec), "", "Pareto front:", ""]
        lines += ["| " + " | ".join(_SEARCH_HEADER) + " |", "|---|---:|---:|---:|---:|---:|---|---|"]
        lines += ["| " + " | ".join(r[:-1] + [f"`{r[-1]}`"]) + " |" for r in search_rows(report)]
        lines += ["", f"Recipe: `{sec['recipe']}`; reproduce with `{sec.get('reproduce', '')}`."]
    lines += ["", "## Passes", "", "| pass | changed | seconds | stats |", "|---|---|---:|---|"]
    for p in report["passes"]:
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items() if not isinstance(v, list | dict))
        lines.append(f"| `{p['pipeline']}` | {_fmt(p['changed'])} | {p['seconds']:.3f} | {stats} |")
    if images:
        lines += ["", "## Plots", ""] + [f"![{n}]({n})" for n in images]
    if report["skipped"]:
        lines += ["", "## Left unchanged, and why", ""]
        lines += [f"- {s['pass']}: `{s['where']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#1f2933;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #cbd2d9;padding:4px 8px}
th{background:#f0f4f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f0f4f8;padding:1px 4px;border-radius:3px}img{max-width:100%;border:1px solid #e4e7eb;margin:.5em 0}
.missed{color:#b42318;font-weight:bold}.met{color:#067647;font-weight:bold}"""


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = "".join(
            f"<td{' class=n' if i in numeric else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "".join(out) + "</table>"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """report.html: the same sections as report.md, with the plots embedded as PNG data.

    Long: it writes the page top to bottom, one section after another, so the code reads in the
    order of the page it produces."""
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>graphslim report</title><style>{_CSS}</style>"
        "</head><body><h1>graphslim report</h1>",
        f"<p>Input <code>{e(report['input']['path'])}</code> (opset {report['input']['opset']}), pipeline "
        f"<code>{e(report['pipeline'])}</code>, graphslim {e(report['versions']['graphslim'])}.</p>",
        _table(["", "before", "after", "ratio"], [list(r) for r in summary_rows(report)], {1, 2, 3}),
    ]
    budgets = report.get("budgets") or {}
    if budgets:
        items = "".join(
            f"<li><code>{e(n)}</code>: {e(b['measure'])} = {e(_fmt(b['value']))}, limit "
            f"{e(_fmt(b['limit']))}: <span class={'met' if b['met'] else 'missed'}>"
            f"{'met' if b['met'] else 'missed'}</span></li>"
            for n, b in budgets.items()
        )
        parts.append(f"<h2>Budgets</h2><ul>{items}</ul>")
    sec = report.get("search")
    if sec:
        parts.append(f"<h2>Search</h2><p>{e(_search_summary(sec))}</p>")
        parts.append(_table(_SEARCH_HEADER, search_rows(report), {1, 2, 3, 4, 5}))
        parts.append(
            f"<p>Recipe: <code>{e(sec['recipe'])}</code>; reproduce with <code>{e(sec.get('reproduce', ''))}</code>.</p>"
        )
    for name, title in (
        ("pareto.png", "Search: Pareto front"),
        ("accuracy.png", "Accuracy vs compression"),
        ("latency.png", "Latency"),
        ("layers.png", "Parameters per layer"),
    ):
        if name in images:
            data = base64.b64encode(images[name]).decode()
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>")
    rows = layer_rows(report)
    if rows:
        parts.append(
            "<h2>Layers</h2>"
            + _table(
                ["layer", "op", "channels", "weight params", "sparsity after", "rank", "precision"],
                [
                    [
                        r["name"],
                        r["op"],
                        f"{_fmt(r['channels_before'])} → {_fmt(r['channels_after'])}",
                        f"{_fmt(r['params_before'])} → {_fmt(r['params_after'])}",
                        "-" if r["sparsity_after"] is None else f"{r['sparsity_after']:.0%}",
                        _fmt(r["rank"]),
                        r["precision_after"] or "-",
                    ]
                    for r in rows
                ],
                {2, 3, 4, 5},
            )
        )
    parts.append(
        "<h2>Passes</h2>"
        + _table(
            ["pass", "changed", "seconds", "stats"],
            [
                [
                    p["pipeline"],
                    _fmt(p["changed"]),
                    f"{p['seconds']:.3f}",
                    ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items() if not isinstance(v, list | dict)),
                ]
                for p in report["passes"]
            ],
            {2},
        )
    )
    if report["skipped"]:
        parts.append(
            "<h2>Left unchanged, and why</h2>"
            + _table(["pass", "where", "reason"], [[s["pass"], s["where"], s["reason"]] for s in report["skipped"]])
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def compare_markdown(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """The ablation table: one row per run."""
    lines = [
        "| run | pipeline | r params | r bytes | r MACs | accuracy | drop (points) | ORT ms b1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in reports:
        acc = r.get("accuracy") or {}
        lat = (r.get("latency") or {}).get("ort_compressed") or {}
        c = r["compression"]
        lines.append(
            f"| {name} | `{r['pipeline']}` | {_fmt(c['r_params'])} | {_fmt(c['r_bytes'])} | "
            f"{_fmt(c['r_macs'])} | {_fmt(acc.get('after'))} | {_fmt(acc.get('drop_points'))} | "
            f"{_fmt(lat.get('median_ms'))} |"
        )
    return "\n".join(lines) + "\n"


def compare_plot(reports: list[tuple[str, dict[str, Any]]]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    pts = [(n, r["compression"]["r_params"], (r.get("accuracy") or {}).get("after")) for n, r in reports]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in pts:
        ax.plot([x], [y], "o")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("compression ratio r (parameters kept)")
    ax.set_ylabel("top-1 accuracy")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def finite_json(value: Any) -> Any:
    """``value`` with NaN and Inf floats replaced by null: JSON has no such numbers (Python would
    write them as NaN and Infinity, which JSON readers reject), and null is "undefined"."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def render_files(report: dict[str, Any]) -> dict[str, bytes]:
    """report.json, report.md, report.html and the plots, as they are written into OUT_DIR."""
    images = plots(report)
    files = {
        "report.json": (json.dumps(finite_json(report), indent=2, allow_nan=False) + "\n").encode(),
        "report.md": render_markdown(report, images).encode(),
        "report.html": render_html(report, images).encode(),
    }
    files.update(images)
    return files
