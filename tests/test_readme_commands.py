"""Every `glora ...` command in the README's bash blocks parses: its options exist under the
names the README uses (each line is run with --help appended, which stops before any work, but
only after every option before it has been parsed). A renamed or removed option fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glora.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("glora ")]


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    args = shlex.split(command)[1:]
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"{command}\n{result.output}"
