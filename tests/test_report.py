"""report.json against its schema, report.md / report.html, graphslim report and compare."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import jsonschema
import pytest
from conftest import EXAMPLE

from graphslim.cli import main
from graphslim.report import SCHEMA_PATH, layer_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    pipes = {
        "prune": "fold-batchnorm,prune-channels{ratio=0.3}",
        "mixed": "fold-batchnorm,prune-channels{ratio=0.3},factorize-svd{rank_ratio=0.5,min_saving=0},quantize-int8{max_drop=5}",
        "spiral": 'fold-batchnorm,spiral{steps=2,passes="prune-channels{ratio=0.2}",distill="",max_drop=100}',
    }
    for name, pipe in pipes.items():
        assert (
            main(
                [
                    "optimize",
                    str(EXAMPLE / "model.onnx"),
                    "-o",
                    str(base / name),
                    "--data",
                    str(EXAMPLE / "data.npz"),
                    "--passes",
                    pipe,
                    "-q",
                    "--max-accuracy-drop",
                    "100",
                ]
            )
            == 0
        )
    return base


def test_report_json_validates_against_schema(runs):
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for name in ("prune", "mixed", "spiral"):
        rep = json.loads((runs / name / "report.json").read_text())
        jsonschema.validate(rep, schema)
    broken = json.loads((runs / "prune" / "report.json").read_text())
    del broken["compression"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_layer_table_tracks_channels_rank_and_precision(runs):
    rep = json.loads((runs / "mixed" / "report.json").read_text())
    rows = {r["name"]: r for r in layer_rows(rep)}
    assert rows["conv2"]["channels_before"] == 32 and rows["conv2"]["channels_after"] < 32
    assert rows["fc1"]["rank"] is not None
    assert all(r["precision_after"] == "int8" for r in rows.values())
    assert rows["fc1"]["params_after"] < rows["fc1"]["params_before"]


def test_html_is_self_contained_with_plots(runs):
    page = (runs / "spiral" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    png = base64.b64decode(page.split("data:image/png;base64,")[1].split("'")[0])
    assert png.startswith(b"\x89PNG")
    assert "Accuracy vs compression" in page and "Left unchanged" in page
    md = (runs / "spiral" / "report.md").read_text()
    assert "| layer | op | channels |" in md and "![accuracy.png](accuracy.png)" in md
    assert (runs / "spiral" / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_report_command_rerenders(runs):
    folder = runs / "prune"
    (folder / "report.html").unlink()
    (folder / "report.md").write_text("stale")
    assert main(["report", str(folder), "-q"]) == 0
    assert (folder / "report.html").exists() and (folder / "report.md").read_text().startswith("# graphslim report")


def test_compare_command(runs, tmp_path, capsys):
    assert main(["compare", str(runs / "prune"), str(runs / "mixed"), "-o", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| prune |" in table and "| mixed |" in table
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        ".graphslim.json",
        "compare.html",
        "compare.md",
        "compare.png",
    ]
    assert main(["compare", str(tmp_path / "nothing-here")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_html_renders_in_headless_chromium(runs, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1100,1800",
            f"--screenshot={shot}",
            (runs / "spiral" / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a page with plots, not a blank one
