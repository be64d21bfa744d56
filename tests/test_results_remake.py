"""Every rendered report under results/ is what today's code makes of its stored runs: a
change to the report code that moves a committed number fails here (tools/check_results.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_committed_reports_are_remade_byte_for_byte():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_results.py")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "every re-made file is the same" in done.stdout
    assert done.stdout.count("\nsame ") + done.stdout.startswith("same ") >= 20  # the reports were found
