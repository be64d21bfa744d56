"""The tuned learning rate per task (``glora sweep --lr-from``): the best mean held-out score
of the federated rules wins, references and incomplete rates do not count, a tuning sweep
scored on the validation split is refused, and the sweep's runs take the chosen rate."""

from __future__ import annotations

import json

import pytest

from glora.experiments.grid.preset import expand, load_preset
from glora.experiments.grid.tuned import tuned_lrs_from
from glora.experiments.sweep.command import sweep_command, with_tuned_lrs


def _sweep(root, runs, eval_split="heldout"):
    """A tuning sweep's folder: runs = [(task, rule, lr, seed, accuracy or None = interrupted)]."""
    index = {"axes": {"tasks": [], "settings": [], "rules": [], "seeds": []}, "runs": {}}
    for i, (task, rule, lr, seed, acc) in enumerate(runs):
        identity = f"run{i}"
        folder = root / identity
        folder.mkdir(parents=True)
        config = {"task": task, "rule": rule, "lr": lr, "seed": seed, "eval_split": eval_split}
        (folder / "config.json").write_text(json.dumps(config))
        if acc is not None:
            summary = {"main_metric": "accuracy", "final": {"accuracy": acc}}
            (folder / "summary.json").write_text(json.dumps(summary))
        index["runs"][identity] = {"labels": [{"task": task, "setting": f"lr-{lr:g}", "rule": rule, "seed": seed}]}
    (root / "sweep.json").write_text(json.dumps(index))
    return root


def test_best_mean_of_federated_rules_wins(tmp_path):
    root = _sweep(
        tmp_path / "t",
        [
            # sst2 at 1e-3: glora 0.70, fedit (0.80 + 0.90) / 2 = 0.85 -> mean 0.775
            ("sst2", "glora", 1e-3, 0, 0.70),
            ("sst2", "fedit", 1e-3, 0, 0.80),
            ("sst2", "fedit", 1e-3, 1, 0.90),
            # sst2 at 2e-3: mean 0.76, although glora alone is better here
            ("sst2", "glora", 2e-3, 0, 0.82),
            ("sst2", "fedit", 2e-3, 0, 0.70),
            # the centralized reference at 2e-3 would lift its mean: references do not count
            ("sst2", "centralized", 2e-3, 0, 0.99),
            # 5e-3: glora is best of all, but fedit did not finish there
            ("sst2", "glora", 5e-3, 0, 0.95),
            ("sst2", "fedit", 5e-3, 0, None),
            # cola: a tie between 2e-3 and 1e-3 goes to the smaller rate
            ("cola", "glora", 2e-3, 0, 0.30),
            ("cola", "glora", 1e-3, 0, 0.30),
        ],
    )
    assert tuned_lrs_from(root) == {"sst2": 1e-3, "cola": 1e-3}


def test_tuning_on_the_validation_split_is_refused(tmp_path):
    root = _sweep(tmp_path / "t", [("sst2", "glora", 1e-3, 0, 0.7)], eval_split="validation")
    with pytest.raises(ValueError, match="never on the validation split"):
        tuned_lrs_from(root)


def test_nothing_finished_is_an_error(tmp_path):
    root = _sweep(tmp_path / "t", [("sst2", "glora", 1e-3, 0, None)])
    with pytest.raises(ValueError, match="no finished federated run"):
        tuned_lrs_from(root)


def test_sweep_runs_take_the_tuned_rate(tmp_path):
    preset = load_preset("data-heterogeneity")
    assert {r.config.lr for r in expand(preset, tasks=["sst2"], seeds=[0])} == {1e-3}
    runs = with_tuned_lrs(expand(preset, tasks=["sst2"], seeds=[0]), {"sst2": 5e-3}, tmp_path)
    assert {r.config.lr for r in runs} == {5e-3}
    assert len({r.identity for r in runs}) == len(runs)


def test_a_task_the_tuning_lacks_is_refused(tmp_path):
    root = _sweep(tmp_path / "t", [("sst2", "glora", 5e-3, 0, 0.8)])
    with pytest.raises(ValueError, match="no tuned learning rate for cola"):
        sweep_command(
            load_preset("data-heterogeneity"), tmp_path / "out", "test", dry_run=True, seeds=[0], lr_from=root
        )


def test_per_rule_each_rule_takes_its_own_best_rate_once_all_its_runs_finished(tmp_path):
    from glora.experiments.grid.tuned import tuned_lrs_per_rule, untuned_rules
    from glora.experiments.sweep_results import load_results

    root = _sweep(
        tmp_path / "t",
        [
            # glora: 2e-3 best on both seeds
            ("sst2", "glora", 1e-3, 0, 0.70),
            ("sst2", "glora", 1e-3, 1, 0.72),
            ("sst2", "glora", 2e-3, 0, 0.80),
            ("sst2", "glora", 2e-3, 1, 0.78),
            # fedit: the smaller rate wins the tie
            ("sst2", "fedit", 1e-3, 0, 0.75),
            ("sst2", "fedit", 2e-3, 0, 0.75),
            # a reference is tuned like a rule
            ("sst2", "centralized", 5e-3, 0, 0.9),
            ("sst2", "centralized", 1e-3, 0, 0.8),
            # flora: its best rate so far, 5e-3, has a seed still running: not tuned yet, although
            # every rate it finished has all its seeds (choosing now would choose among the rates
            # that happen to have run)
            ("sst2", "flora", 1e-3, 0, 0.70),
            ("sst2", "flora", 1e-3, 1, 0.70),
            ("sst2", "flora", 5e-3, 0, 0.95),
            ("sst2", "flora", 5e-3, 1, None),
        ],
    )
    lrs = tuned_lrs_per_rule(load_results(root))
    assert lrs == {("sst2", "glora"): 2e-3, ("sst2", "fedit"): 1e-3, ("sst2", "centralized"): 5e-3}
    runs = expand(load_preset("data-heterogeneity"), tasks=["sst2"], settings=["iid"], rules=["glora", "fedit"])
    tuned = with_tuned_lrs(runs, lrs, root)
    assert {(r.config.rule, r.config.lr) for r in tuned} == {("glora", 2e-3), ("fedit", 1e-3)}
    flora = expand(load_preset("data-heterogeneity"), tasks=["sst2"], rules=["flora"])
    with pytest.raises(ValueError, match=r"no tuned learning rate for sst2/flora \(3 of 4 runs finished\)"):
        with_tuned_lrs(flora, lrs, root, progress=untuned_rules(load_results(root)))
    # The sweep reads the tuning folder once and says the same.
    with pytest.raises(ValueError, match=r"no tuned learning rate for sst2/flora \(3 of 4 runs finished\)"):
        sweep_command(
            load_preset("data-heterogeneity"),
            tmp_path / "out",
            "test",
            dry_run=True,
            seeds=[0],
            tasks=["sst2"],
            rules=["flora"],
            lr_from=root,
            lr_per_rule=True,
        )


def test_a_rule_tuned_as_another_takes_its_rate_unless_it_has_its_own(tmp_path):
    from glora.experiments.grid.preset import PlannedRun

    base = expand(load_preset("data-heterogeneity"), tasks=["sst2"], settings=["iid"], rules=["centralized"])[0]
    steps = PlannedRun(base.config.replace(rule="centralized-steps"), base.labels, base.estimate_seconds)
    lrs = {("sst2", "centralized"): 5e-3}
    assert with_tuned_lrs([steps], lrs, tmp_path)[0].config.lr == 5e-3
    lrs[("sst2", "centralized-steps")] = 2e-3
    assert with_tuned_lrs([steps], lrs, tmp_path)[0].config.lr == 2e-3


def test_a_stale_plan_of_a_cell_a_newer_run_filled_does_not_hold_the_rule_back(tmp_path):
    """An index keeps the runs older code planned: HetLoRA's default changed, so its cells got
    new identities and the old ones stay listed, never run."""
    from glora.experiments.grid.tuned import tuned_lrs_per_rule, untuned_rules
    from glora.experiments.sweep_results import load_results

    root = _sweep(
        tmp_path / "t",
        [
            ("sst2", "hetlora", 1e-3, 0, 0.70),
            ("sst2", "hetlora", 2e-3, 0, 0.80),
            ("sst2", "hetlora", 1e-3, 0, None),  # the old plan of the same cell, never run
        ],
    )
    res = load_results(root)
    assert untuned_rules(res) == {}
    assert tuned_lrs_per_rule(res) == {("sst2", "hetlora"): 2e-3}


def test_a_task_a_preset_points_at_another_takes_that_tasks_rates(tmp_path):
    from glora.experiments.grid.preset import parse_preset

    data = {
        "rules": ["glora", "fedit"],
        "seeds": [0],
        "base": {"clients": 3, "ranks": "8", "rounds": 1, "local_steps": 1},
        "tasks": {"sst2": {}, "cola": {"lr_task": "sst2"}},
        "settings": {"iid": {"alpha": "iid"}},
    }
    preset = parse_preset(data, "test")
    assert preset.lr_tasks == {"cola": "sst2"} and preset.tasks["cola"] == {}
    lrs = {("sst2", "glora"): 2e-3, ("sst2", "fedit"): 5e-4}
    runs = with_tuned_lrs(expand(preset), lrs, tmp_path, preset.lr_tasks)
    assert {(r.config.task, r.config.rule, r.config.lr) for r in runs} == {
        ("sst2", "glora", 2e-3),
        ("sst2", "fedit", 5e-4),
        ("cola", "glora", 2e-3),
        ("cola", "fedit", 5e-4),
    }
    # Without the pointer, CoLA has no tuned rate: refused, naming it.
    with pytest.raises(ValueError, match="no tuned learning rate for cola/fedit, cola/glora"):
        with_tuned_lrs(expand(preset), lrs, tmp_path)


def test_the_rate_table_shows_every_rate_the_choice_and_the_rules_still_tuning(tmp_path):
    from typer.testing import CliRunner

    from glora.cli import app

    root = _sweep(
        tmp_path / "t",
        [
            ("sst2", "glora", 1e-3, 0, 0.70),
            ("sst2", "glora", 1e-3, 1, 0.72),
            ("sst2", "glora", 2e-3, 0, 0.80),
            ("sst2", "glora", 2e-3, 1, 0.78),
            ("sst2", "glora", 5e-3, 0, 0.60),
            ("sst2", "glora", 5e-3, 1, 0.62),
            ("sst2", "fedit", 1e-3, 0, 0.75),
            ("sst2", "fedit", 5e-3, 0, 0.85),
            ("sst2", "flora", 1e-3, 0, 0.70),
            ("sst2", "flora", 5e-3, 0, None),
        ],
    )
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["rates", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| task | rule | 0.001 | 0.002 | 0.005 | chosen |"
    assert "| sst2 | glora | 0.7100 (2) | 0.7900 (2) | 0.6100 (2) | **0.002** |" in lines
    assert "| sst2 | fedit | 0.7500 (1) |  | 0.8500 (1) | **0.005** (the largest rate tried) |" in lines
    assert "| sst2 | flora | 0.7000 (1) |  |  | not yet: 1 of 2 runs finished |" in lines
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_rule_tuned_as_another_waits_for_its_own_tuning_where_the_sweep_has_it(tmp_path):
    from glora.experiments.grid.preset import PlannedRun
    from glora.experiments.grid.tuned import tuned_lrs_per_rule, untuned_rules
    from glora.experiments.sweep_results import load_results

    root = _sweep(
        tmp_path / "t",
        [
            ("sst2", "centralized", 1e-3, 0, 0.80),
            ("sst2", "centralized-steps", 1e-3, 0, 0.70),
            ("sst2", "centralized-steps", 2e-3, 0, None),  # still running
        ],
    )
    lrs = tuned_lrs_per_rule(load_results(root))
    base = expand(load_preset("data-heterogeneity"), tasks=["sst2"], settings=["iid"], rules=["centralized"])[0]
    steps = PlannedRun(base.config.replace(rule="centralized-steps"), base.labels, base.estimate_seconds)
    with pytest.raises(ValueError, match=r"sst2/centralized-steps \(1 of 2 runs finished\)"):
        with_tuned_lrs([steps], lrs, root, progress=untuned_rules(load_results(root)))


def test_a_rule_of_the_sweeps_axes_with_no_run_indexed_is_listed_as_untuned(tmp_path):
    from glora.experiments.grid.tuned import rate_table, untuned_rules
    from glora.experiments.sweep_results import load_results

    root = _sweep(tmp_path / "t", [("sst2", "glora", 1e-3, 0, 0.70)])
    index = json.loads((root / "sweep.json").read_text())
    index["axes"].update(tasks=["sst2"], rules=["glora", "hetlora"])  # a sweep run with --only-rules glora
    (root / "sweep.json").write_text(json.dumps(index))
    res = load_results(root)
    assert untuned_rules(res) == {("sst2", "hetlora"): "no run of it in the sweep yet"}
    assert "| sst2 | hetlora |  | not yet: no run of it in the sweep yet |" in rate_table(res)
