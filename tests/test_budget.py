"""The round budget from a pilot sweep (``glora budget``): the smallest candidate R at which
every rule's seed-mean score at R is within the tolerance of its score at 2R; an unfinished
pilot is refused; reading a pilot writes nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glora.cli import app
from glora.experiments.budget import budget_markdown, pilot_budget
from glora.experiments.sweep_results import load_results

ROUNDS = (10, 20, 30, 40, 50, 60, 70, 80)


def _pilot(root, curves, finished=True, setting_of=lambda rule, seed: "iid"):
    """A pilot sweep's folder: curves = {(rule, seed): {round: accuracy}}, every run of SST-2,
    in the setting ``setting_of`` gives it."""
    index = {"axes": {"tasks": ["sst2"], "settings": ["iid"], "rules": ["glora", "fedit"], "seeds": []}, "runs": {}}
    for i, ((rule, seed), points) in enumerate(curves.items()):
        setting = setting_of(rule, seed)
        folder = root / f"run{i}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"task": "sst2", "rule": rule, "seed": seed}))
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps({"round": r, "eval": {"accuracy": a}}) + "\n" for r, a in points.items())
        )
        if finished or i:
            summary = {"main_metric": "accuracy", "final": {"accuracy": points[max(points)]}}
            (folder / "summary.json").write_text(json.dumps(summary))
        index["runs"][f"run{i}"] = {"labels": [{"task": "sst2", "setting": setting, "rule": rule, "seed": seed}]}
    (root / "sweep.json").write_text(json.dumps(index))
    return root


def _curve(values):
    return dict(zip(ROUNDS, values, strict=True))


# glora is flat from R = 10 (seed means: 0.80, 0.805, ...); fedit moves 3 points from 10 to 20,
# 1.5 from 20 to 40 (seed means 0.760, 0.790, 0.800, 0.805, ...: not flat at 20), 0.5 from 40 to 80.
CURVES = {
    ("glora", 0): _curve([0.79, 0.80, 0.80, 0.81, 0.81, 0.81, 0.81, 0.81]),
    ("glora", 1): _curve([0.81, 0.81, 0.81, 0.81, 0.81, 0.81, 0.81, 0.81]),
    ("fedit", 0): _curve([0.75, 0.78, 0.79, 0.80, 0.80, 0.80, 0.80, 0.80]),
    ("fedit", 1): _curve([0.77, 0.80, 0.80, 0.81, 0.81, 0.81, 0.81, 0.82]),
}


def test_the_budget_is_the_smallest_r_at_which_every_rule_is_flat(tmp_path):
    b = pilot_budget(load_results(_pilot(tmp_path / "p", CURVES)), "sst2", "iid")
    assert b.candidates == [10, 20, 40]
    gains = {(c.rule, c.rounds): round(c.gain, 6) for c in b.checks}
    assert gains == {
        ("glora", 10): 0.005,
        ("glora", 20): 0.005,
        ("glora", 40): 0.0,
        ("fedit", 10): 0.03,
        ("fedit", 20): 0.015,
        ("fedit", 40): 0.005,
    }
    assert b.rounds == 40
    text = budget_markdown(b)
    assert "| fedit | 20 | 2 | 0.7900 | 0.8050 | +0.0150 | no |" in text
    assert "Budget: **40 rounds**" in text


def test_a_gain_of_exactly_the_tolerance_is_flat_and_a_drop_counts_like_a_gain(tmp_path):
    res = load_results(_pilot(tmp_path / "p", CURVES))
    assert pilot_budget(res, "sst2", "iid", tolerance=0.03).rounds == 10
    falling = {key: {r: 1.0 - a for r, a in c.items()} for key, c in CURVES.items()}
    assert pilot_budget(load_results(_pilot(tmp_path / "f", falling)), "sst2", "iid").rounds == 40


def test_no_flat_candidate_is_said_in_words(tmp_path):
    b = pilot_budget(load_results(_pilot(tmp_path / "p", CURVES)), "sst2", "iid", tolerance=0.001)
    assert b.rounds is None
    assert "A budget of 80 rounds was not shown to be flat" in budget_markdown(b)


def test_an_unfinished_pilot_and_a_candidate_without_its_double_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the pilot is not finished: 1 of 4 runs of sst2/iid"):
        pilot_budget(load_results(_pilot(tmp_path / "p", CURVES, finished=False)), "sst2", "iid")
    res = load_results(_pilot(tmp_path / "q", CURVES))
    with pytest.raises(ValueError, match=r"missing for \[50\]"):
        pilot_budget(res, "sst2", "iid", candidates=[20, 50])


def test_the_command_prints_the_budget_and_writes_nothing(tmp_path):
    root = _pilot(tmp_path / "p", CURVES)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["budget", str(root), "--candidates", "10,20"])
    assert result.exit_code == 0, result.output
    assert "No candidate R (10, 20) is flat for every rule" in result.output
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    bad = CliRunner().invoke(app, ["budget", str(root), "--candidates", "10,x"])
    assert bad.exit_code == 2 and "--candidates takes positive whole numbers" in bad.output


def test_each_setting_of_a_pilot_is_read_on_its_own(tmp_path):
    # seed 1 of each rule in another setting: each setting then holds one seed of each rule,
    # and neither setting's curves may overwrite the other's.
    root = _pilot(tmp_path / "p", CURVES, setting_of=lambda rule, seed: "iid" if seed == 0 else "other")
    from glora.experiments.budget import pilot_budgets

    budgets = pilot_budgets(load_results(root))
    assert [(b.task, b.setting) for b in budgets] == [("sst2", "iid"), ("sst2", "other")]
    first = {(c.rule, c.rounds): (c.at_r, c.seeds) for c in budgets[0].checks}
    assert first[("fedit", 10)] == (0.75, 1) and first[("glora", 10)] == (0.79, 1)
    second = {(c.rule, c.rounds): (c.at_r, c.seeds) for c in budgets[1].checks}
    assert second[("fedit", 10)] == (0.77, 1) and second[("glora", 10)] == (0.81, 1)


def test_a_negative_tolerance_and_an_empty_sweep_are_refused(tmp_path):
    res = load_results(_pilot(tmp_path / "p", CURVES))
    with pytest.raises(ValueError, match=r">= 0, not -0\.01"):
        pilot_budget(res, "sst2", "iid", tolerance=-0.01)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "sweep.json").write_text(json.dumps({"axes": {}, "runs": {}}))
    result = CliRunner().invoke(app, ["budget", str(empty)])
    assert result.exit_code == 2 and "the sweep lists no run" in result.output
