"""The GPU check's code (benchmarks/gpu_check.py) on this CPU with a tiny Llama: the path a
leased GPU machine runs, so that its one prepared command does not fail on a bug there."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_check_measures_each_precision_and_names_what_cannot_run(tmp_path):
    out = tmp_path / "check"
    args = ["--tiny", "--device", "cpu", "--precisions", "float32,4bit", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    run = result["precisions"]["float32"]
    step, fed = run["local_step"], run["federated"]
    assert len(step["step_seconds"]) == 2 and all(t > 0 for t in step["step_seconds"])
    assert step["peak_memory_mb"] > step["weights_mb"] > 0 and step["parameters"] > 0
    assert 0.0 <= fed["rougeL"] <= 100.0 and fed["wall_seconds"] > 0
    summary = json.loads((Path(fed["run_folder"]) / "summary.json").read_text())
    assert summary["final"]["rougeL"] == fed["rougeL"] and summary["rounds"] == 1
    # No CUDA and no bitsandbytes here: 4-bit is recorded as what could not run, and why.
    # Each part on its own: both 4-bit measurements say why, and the float32 row stands.
    assert all("bitsandbytes" in part["error"] for part in result["precisions"]["4bit"].values())
    table = (out / "gpu_check.md").read_text()
    assert "| float32 | " in table and "| 4bit | error: " in table
    assert math.isfinite(step["step_seconds_median"])


def test_the_script_without_its_bundle_says_how_to_make_it(tmp_path):
    if (ROOT / ".gpu-check" / "wheels").is_dir():
        pytest.skip("this checkout has a prepared .gpu-check/")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "bash benchmarks/gpu_check.sh --prepare" in done.stderr
