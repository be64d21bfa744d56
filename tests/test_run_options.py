"""One source of truth for run options: RunConfig's field declarations make the `glora run`
options, the --config TOML and the Flower run config, with one spelling each."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import ClassVar

import pytest
import typer
from typer.testing import CliRunner

from glora.federation.config import FEDERATION, RunConfig, option
from glora.federation.config_template import run_toml
from glora.flower.config import EXAMPLE, FlowerOptions, flower_toml, from_run_config, to_run_config
from glora.run_command import run_command
from glora.tasks import FAMILIES
from glora.tasks.base import TaskFamily

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ToyConfig(RunConfig):
    """RunConfig plus one field, declared the way every field is: nothing else is edited."""

    toy_knob: int = option(3, "A toy option for this test.", FEDERATION)


class ToyTask(TaskFamily):
    defaults: ClassVar[dict] = {"rounds": 7, "alpha": None}


def cli_config(cls: type[RunConfig], args: list[str]) -> RunConfig:
    """The config `glora run ARGS` would run, for the fields of ``cls``."""
    seen: list[RunConfig] = []
    app = typer.Typer(rich_markup_mode="markdown")  # as glora's: "rich" would drop "[default: ...]"
    app.command(name="run")(run_command(cls, lambda cfg, folder, resume, progress: seen.append(cfg)))
    app.command(name="other")(lambda: None)  # two commands, so `run` is a subcommand as in glora
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_a_new_field_is_an_option_of_the_cli_the_toml_file_and_flower(tmp_path):
    assert cli_config(ToyConfig, ["--toy-knob", "5"]).toy_knob == 5
    assert cli_config(ToyConfig, []).toy_knob == 3
    help_text = (
        CliRunner().invoke(_app(ToyConfig), ["run", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
    )
    assert "--toy-knob" in help_text and "A toy option for this test. [default: 3]" in help_text

    toml = tmp_path / "run.toml"
    toml.write_text(run_toml(ToyConfig(toy_knob=9)))
    assert "toy_knob = 9" in toml.read_text()
    assert ToyConfig.from_toml(toml) == ToyConfig(toy_knob=9)
    assert cli_config(ToyConfig, ["--config", str(toml)]).toy_knob == 9

    flower = to_run_config(ToyConfig(toy_knob=11))
    assert flower["toy-knob"] == 11
    assert from_run_config(flower, ToyConfig)[0] == ToyConfig(toy_knob=11)
    assert "toy-knob = 11" in flower_toml(ToyConfig(toy_knob=11))


def _app(cls):
    app = typer.Typer(rich_markup_mode="markdown")  # as glora's: "rich" would drop "[default: ...]"
    app.command(name="run")(run_command(cls, lambda *a: None))
    app.command(name="other")(lambda: None)
    return app


def test_a_new_task_family_is_known_to_the_cli_the_toml_file_and_flower(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", ToyTask)
    assert cli_config(RunConfig, ["--task", "toy"]).rounds == 7  # the family's default
    assert cli_config(RunConfig, ["--task", "toy", "--rounds", "2"]).rounds == 2
    help_text = (
        CliRunner().invoke(_app(RunConfig), ["run", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
    )
    assert "[default: 12; superni, instructions: 5; toy: 7]" in help_text
    toml = tmp_path / "toy.toml"
    toml.write_text('task = "toy"\n')
    assert RunConfig.from_toml(toml).rounds == 7 and RunConfig.from_toml(toml).alpha is None
    assert from_run_config({"task": "toy"})[0].rounds == 7


@pytest.mark.parametrize("task", ["sst2", "superni"])
def test_the_toml_template_reads_back_as_the_config_it_was_written_from(tmp_path, task):
    toml = tmp_path / "run.toml"
    toml.write_text(run_toml(RunConfig.for_task(task, rule_options={"rank": 16}, head_lr=0.01)))
    assert RunConfig.from_toml(toml) == RunConfig.for_task(task, rule_options={"rank": 16}, head_lr=0.01)


def test_iid_is_spelled_the_same_everywhere(tmp_path):
    assert cli_config(RunConfig, ["--alpha", "iid"]).alpha is None
    assert cli_config(RunConfig, ["--alpha", "0.1"]).alpha == 0.1
    toml = tmp_path / "iid.toml"
    toml.write_text('alpha = "iid"\n')
    assert RunConfig.from_toml(toml).alpha is None
    assert to_run_config(RunConfig(alpha=None))["alpha"] == "iid"
    assert from_run_config({"alpha": "iid"})[0].alpha is None
    # An empty alpha once meant IID in the Flower config; read as "not given" it would be 0.5.
    with pytest.raises(ValueError, match="option alpha is empty: give a value or 'iid'"):
        from_run_config({"alpha": ""})
    assert cli_config(RunConfig, ["--superni-eval-tasks", "all"]).superni_eval_tasks is None


def test_every_field_is_a_cli_option_that_sets_it():
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(hints[f.name]).removeprefix("<class '")
        if kind.startswith("bool"):
            on = getattr(RunConfig(), f.name) is not True
            args, expected = [flag if on else f"--no-{flag[2:]}"], on
        elif kind.startswith("dict"):
            args, expected = ["--rule-option", "rank=16"], {"rank": 16}
        elif kind.startswith("tuple"):
            args, expected = [flag, "a,b"], ("a", "b")
        elif kind.startswith("str"):
            value = "superni" if f.name == "task" else "x"  # a task must be known
            args, expected = [flag, value], value
        else:
            args, expected = [flag, "7"], 7
        assert getattr(cli_config(RunConfig, args), f.name) == expected, f.name


def test_pyproject_declares_the_generated_flower_section():
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.flwr.app.config]") :].split("\n\n")[0] + "\n"
    assert section == flower_toml(), "pyproject.toml is stale: replace its section with `glora config --flower`"
    declared = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert from_run_config(declared) == (EXAMPLE, FlowerOptions())
