"""Probes of a hostile user (issue #30), each kept as a test so that none can come back:
typed rule options, numeric options checked up front, one writer per run folder, a torn
metrics line recovered, a damaged checkpoint named, a finished run never begun again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glora import tasks
from glora.aggregation import get_rule
from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.federation.results import RunStore, open_run
from glora.federation.simulation import Federation, run_federation
from glora.models.backbones import resolve_backbone
from tests.test_own_data import ToyTask


def test_rule_options_are_typed_against_the_rule():
    # "False" from the command line was a truthy string: merge-and-restart silently on.
    assert check_config(RunConfig(rule_options={"restart": "False"})).restart is False
    assert check_config(RunConfig(rule_options={"restart": "true"})).restart is True
    rule = get_rule("glora", rank="16", dtype="float32", threshold="0.5")
    assert (rule.rank, rule.dtype, rule.threshold) == (16, torch.float32, 0.5)
    for options, words in (
        ({"rank": "abc"}, "glora: rank 'abc': give an int >= 1, 'max', '2max', 'sum' or 'sum<=N'"),
        ({"restart": "maybe"}, "option restart 'maybe': give true or false"),
        ({"dtype": "int8"}, "give a floating torch dtype"),
        ({"consensus": "vote"}, "allowed 'projector', 'energy'"),
        ({"threshold": "nan"}, "give a finite number"),
        ({"ranks": 4}, "unknown option 'ranks'; its options are rank, threshold"),
    ):
        with pytest.raises(ValueError, match=words):
            check_config(RunConfig(rule_options=options))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"lr": float("nan")}, "--lr must be a finite number > 0"),
        ({"lr": float("inf")}, "--lr must be a finite number > 0"),
        ({"head_lr": float("nan")}, "--head-lr must be a finite number > 0"),
        ({"max_train_examples": -5}, "--max-train-examples must be >= 1"),
        ({"threads": 0}, "--threads must be >= 1"),
        ({"alpha": float("nan")}, "--alpha must be > 0"),
    ],
)
def test_numeric_options_are_checked_before_anything_loads(change, words):
    with pytest.raises(ValueError, match=words):
        check_config(RunConfig(**change))


def test_a_second_writer_of_one_run_folder_is_refused_naming_the_first(tmp_path):
    store = RunStore(tmp_path / "run")
    with store.lock():
        proc = subprocess.run(
            [sys.executable, "-m", "glora.cli", "run", "--out", str(tmp_path / "run"), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "is being written by process" in message and "choose another --out" in message
    with store.lock():  # released: the folder can be taken again
        pass


def test_a_torn_last_metrics_line_is_dropped_and_any_other_damage_named(tmp_path):
    store = RunStore(tmp_path)
    rows = [{"round": 1, "x": 1.0}, {"round": 2, "x": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    store.path("metrics.jsonl").write_text(text + '{"round": 3, "x"')  # a crash mid-append
    assert store.metrics() == rows and store.torn_metrics_line()
    store.truncate_metrics(2)  # what a resume does: the file is whole again
    assert store.path("metrics.jsonl").read_text() == text and not store.torn_metrics_line()
    store.path("metrics.jsonl").write_text(text.replace('{"round": 2', '{"round: 2') + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON metrics row"):
        store.metrics()


def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path):
    store = RunStore(tmp_path)
    store.path("checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint\.pt is damaged"):
        store.load_checkpoint()
    store.save_checkpoint({"state": 1})
    store.path("checkpoint.pt").write_bytes(store.path("checkpoint.pt").read_bytes()[:50])
    with pytest.raises(ValueError, match="delete it to begin the run again"):
        store.load_checkpoint()


def test_a_run_toml_of_wrong_types_is_one_error(tmp_path):
    assert RunConfig.from_dict({"lr": "1e-3", "alpha": "iid"}).lr == 1e-3  # what TOML users write
    assert RunConfig.from_dict({"alpha": "iid"}).alpha is None
    for values, words in (
        ({"rounds": "two"}, "option rounds 'two': give an integer"),
        ({"alpha": "x"}, "give a number"),
    ):
        with pytest.raises(ValueError, match=words):
            RunConfig.from_dict(values)
    toml = tmp_path / "run.toml"
    toml.write_text('rounds = "two"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "glora.cli", "run", "--config", str(toml), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "option rounds 'two': give an integer" in " ".join(proc.stderr.split())


def test_a_missing_backbone_folder_is_named():
    with pytest.raises(ValueError, match="backbone folder /no/such/model does not exist"):
        resolve_backbone("/no/such/model")


def test_a_resume_refused_for_a_changed_config_names_the_change(tmp_path):
    store = RunStore(tmp_path / "run")
    old = RunConfig(rounds=3)
    store.start(old.to_dict(), old.identity())
    with pytest.raises(ValueError, match=r"changed: rounds 3 -> 4"):
        Federation(RunConfig(rounds=4), tmp_path / "run", progress=False).begin(resume=True)


def test_a_finished_run_without_its_checkpoint_is_not_begun_again_and_open_run_reads_it(tmp_path, monkeypatch):
    """results/ keeps finished runs without checkpoint.pt. Resuming one used to begin it again
    from round 1: config.json and meta.json rewritten, metrics.jsonl emptied. It must be refused
    with every file as it was, and open_run reads the run without writing either."""
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)
    cfg = RunConfig.for_task("toy", clients=2, ranks="2", rounds=1, local_steps=1, batch_size=8, threads=1)
    out = tmp_path / "run"
    run_federation(cfg, out, progress=False)
    (out / "checkpoint.pt").unlink()

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    assert {"config.json", "meta.json", "metrics.jsonl", "summary.json"} <= before.keys()
    with pytest.raises(ValueError, match=r"finished run .*nothing to resume.*open_run"):
        Federation(cfg, out, progress=False).begin(resume=True)
    assert files() == before

    run = open_run(out)
    assert run.config.identity() == cfg.identity()
    assert [r["round"] for r in run.metrics] == [1] and run.summary["rounds"] == 1
    assert run.meta["git_commit"] and run.adapter == out / "adapter" and run.checkpoint is None
    assert files() == before


def test_open_run_names_what_a_folder_lacks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-run is not a run folder: it does not exist"):
        open_run(tmp_path / "no-run")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half is not a run folder: it has no meta.json, metrics.jsonl"):
        open_run(tmp_path / "half")
