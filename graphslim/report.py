"""Human-readable rendering of ``report.json`` (Markdown)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    b, a, c = report["before"], report["after"], report["compression"]
    lines = [
        "# graphslim report",
        "",
        f"- input: `{report['input']['path']}` (sha256 {report['input']['sha256'][:12]}, opset {report['input']['opset']})",
        f"- pipeline: `{report['pipeline']}`",
        f"- graphslim {report['versions']['graphslim']}, onnxruntime {report['versions']['onnxruntime']}",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {_fmt(b['params'])} | {_fmt(a['params'])} | {_fmt(c['r_params'])} |",
        f"| MACs | {_fmt(b['macs'])} | {_fmt(a['macs'])} | {_fmt(c['r_macs'])} |",
        f"| size on disk (bytes) | {_fmt(b['size_bytes'])} | {_fmt(a['size_bytes'])} | {_fmt(c['r_bytes'])} |",
        f"| weight sparsity | {_fmt(b['sparsity'])} | {_fmt(a['sparsity'])} | |",
        f"| nodes | {_fmt(b['nodes'])} | {_fmt(a['nodes'])} | |",
    ]
    acc = report.get("accuracy")
    if acc:
        lines.append(f"| accuracy ({acc['samples']} samples) | {acc['before']:.4f} | {acc['after']:.4f} | "
                     f"drop {acc['drop_points']:.2f} points |")
    lat = report.get("latency")
    if lat:
        o, n = lat["ort_original"], lat["ort_compressed"]
        ratio = n["median_ms"] / o["median_ms"] if o["median_ms"] else None
        lines.append(f"| ORT latency, batch {o['batch']} (median ms) | {o['median_ms']:.4g} | {n['median_ms']:.4g} "
                     f"| {_fmt(ratio)} |")
    fid = report.get("fidelity")
    if fid and "error" not in fid:
        lines += ["", f"Fidelity to the original on {fid['samples']} samples ({fid['on']}): max abs diff "
                  f"{fid['max_abs_diff']:.3g}, cosine {fid['cosine']:.6f}, top-1 agreement {_fmt(fid['top1_agreement'])}."]
    lines += ["", "## Passes", "", "| pass | changed | seconds | stats |", "|---|---|---:|---|"]
    for p in report["passes"]:
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items() if not isinstance(v, list | dict))
        lines.append(f"| `{p['pipeline']}` | {'yes' if p['changed'] else 'no'} | {p['seconds']:.3f} | {stats} |")
    if report["skipped"]:
        lines += ["", "## Left unchanged, and why", ""]
        lines += [f"- {s['pass']}: `{s['where']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"
