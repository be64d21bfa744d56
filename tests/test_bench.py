"""`glora bench` runs the packaged benchmark (no source checkout needed) and records the
command that invoked it; one small case, so the test takes seconds."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from glora.cli import app
from glora.experiments.bench.report import markdown


def test_glora_bench_measures_a_case_and_records_its_command(tmp_path):
    args = ["--quick", "--cases", "layer 256x256, K=10, rank 8", "--rules", "glora", "--threads", "1"]
    args += ["--repeats", "1", "--budget", "0.1", "--out", str(tmp_path)]
    out = CliRunner().invoke(app, ["bench", *args])
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "aggregation.json").read_text())
    assert data["meta"]["command"] == " ".join(["glora", "bench", *args])
    assert {(r["case"], r["rule"], r["status"]) for r in data["results"]} == {
        ("layer 256x256, K=10, rank 8", "floor", "measured"),
        ("layer 256x256, K=10, rank 8", "glora", "measured"),
    }
    report = (tmp_path / "aggregation.md").read_text()
    assert f"Made by `{data['meta']['command']}`" in report
    # The report is re-made from the raw numbers alone.
    assert markdown(data, "LLaMA-7B q/v, K=50, ranks 4-16", ["scaling_d.png"]) == report


def test_glora_bench_help_and_bad_options():
    runner = CliRunner()
    shown = runner.invoke(app, ["bench", "--help"])
    assert shown.exit_code == 0 and "usage: glora bench" in shown.output and "--quick" in shown.output
    bad = runner.invoke(app, ["bench", "--rules", "nope"])
    assert bad.exit_code == 2
