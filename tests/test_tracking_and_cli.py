"""Around a run (issue #32): trackers get the same per-round values as metrics.jsonl,
Ctrl-C prints the command that continues the run, glora --version names the code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from glora.cli import app
from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.federation.results import RunStore
from glora.federation.simulation import run_federation
from glora.tracking import flatten, open_trackers, parse_report_to, tracked_ids

TINY = RunConfig(
    clients=2,
    ranks="2,4",
    rounds=2,
    local_steps=2,
    batch_size=16,
    eval_every=1,
    max_train_examples=120,
    max_eval_examples=24,
    min_client_examples=10,
    threads=1,
)


def test_flatten_names_every_number_of_a_row():
    row = {
        "round": 2,
        "train_loss": 0.5,
        "bytes_up": 10,
        "clients": [0, 1],
        "eval": {"accuracy": 0.75},
        "eval_by_rank": {"2": {"accuracy": 0.5}},
    }
    assert flatten(row) == {
        "train_loss": 0.5,
        "bytes_up": 10.0,
        "eval/accuracy": 0.75,
        "eval_by_rank/2/accuracy": 0.5,
    }


def test_unknown_or_missing_trackers_are_refused_up_front(monkeypatch):
    with pytest.raises(ValueError, match="--report-to 'comet': choose from none, tensorboard, mlflow, wandb"):
        check_config(TINY.replace(report_to="comet"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="--report-to wandb needs the wandb package"):
        parse_report_to("wandb")
    assert TINY.replace(report_to="tensorboard").identity() == TINY.identity()


@pytest.mark.slow
def test_tensorboard_and_mlflow_get_the_rows_of_metrics_jsonl(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    folder = tmp_path / "sweep" / "run"
    run_federation(TINY.replace(report_to="tensorboard,mlflow"), folder, progress=False)
    rows = {r["round"]: flatten(r) for r in RunStore(folder).metrics()}
    assert set(rows) == {1, 2}

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    for key in ("eval/accuracy", "eval_by_rank/4/accuracy", "train_loss", "bytes_up"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({t: row[key] for t, row in rows.items()}, rel=1e-6), key

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep")  # the run folder's parent groups its runs
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.params["rule"] == "glora"
    for key in ("eval/accuracy", "train_loss", "server_seconds"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({t: row[key] for t, row in rows.items()}, rel=1e-6), key


@pytest.mark.slow
def test_ctrl_c_prints_the_command_that_resumes(tmp_path):
    folder = tmp_path / "run"
    argv = [sys.executable, "-m", "glora.cli", "run", "--rounds", "50", "--clients", "2", "--ranks", "2"]
    argv += ["--local-steps", "1", "--max-train-examples", "100", "--max-eval-examples", "16", "--threads", "1"]
    argv += ["--min-client-examples", "10", "--eval-every", "50", "--out", str(folder), "--no-progress"]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        # A job started in the background of a shell inherits SIGINT ignored, and Python then
        # keeps ignoring it: the run must get Ctrl-C as a terminal would send it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not RunStore(folder).metrics() and time.time() < deadline:  # a round has finished
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in err and "continue from the last checkpoint with:" in err
    command = err.split("continue from the last checkpoint with:")[1].split()
    assert command[:2] == ["glora", "run"] and "--resume" in command and str(folder) in command


def test_version_names_the_package():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("glora 0.1.0")


def test_help_shows_what_each_argument_is():
    for command, words in (("sweep", "A packaged preset"), ("table", "Run folders"), ("report", "--results folder")):
        result = CliRunner().invoke(app, [command, "--help"])
        assert words in " ".join(result.output.replace("│", " ").split()), command


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    folder = tmp_path / "sweep" / "run"
    folder.mkdir(parents=True)
    for step in (1, 2):  # the run, interrupted after round 1, then resumed
        (tracker,) = open_trackers(["mlflow"], folder, {"rule": "glora"})
        tracker.log(step, {"train_loss": 0.5 / step})
        tracker.close()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert tracked_ids(folder) == {"mlflow": run.info.run_id}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == {1: 0.5, 2: 0.25}
