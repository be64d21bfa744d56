"""Sweeps: presets expand into distinct runs, a re-run skips what finished and repeats
nothing, an interrupted sweep resumes where it stopped, failures are recorded and passed."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from glora.aggregation import RULES
from glora.cli import app
from glora.experiments.grid.estimate import CostModel, estimate_seconds
from glora.experiments.grid.preset import expand, load_preset, packaged_presets
from glora.experiments.render.report import markdown
from glora.experiments.sweep import runner as sweep_mod
from glora.experiments.sweep.command import sweep_command
from glora.experiments.sweep.runner import run_sweep
from glora.experiments.sweep.time_left import TimeLeft, print_plan
from glora.experiments.sweep_results import ERROR, INDEX, load_results, run_status
from glora.federation.config import RunConfig
from glora.federation.engine import client_steps
from glora.federation.results import SUMMARY, RunStore, run_device

GRID = """
name = "tiny-grid"
rules = ["glora", "fedit", "centralized"]
seeds = [0, 1]
[base]
clients = 4
ranks = "8"
rounds = 2
[tasks.sst2]
lr = 2e-3
[settings.iid]
alpha = "iid"
note = "IID"
[settings.skew]
alpha = 0.5
[settings.energy]
rules = ["glora"]
rule_options = { consensus = "energy" }
"""


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "tiny-grid.toml"
    path.write_text(GRID)
    return path


class FakeRuns:
    """Stands in for run_federation: writes a run folder as the real loop does (config, one
    metrics line a round, a summary at the end), records every call, and fails or is
    interrupted in round 2 of the runs a test names."""

    def __init__(self, fail=(), interrupt=()):
        self.calls: list[tuple[str, bool]] = []
        self.fail, self.interrupt = set(fail), set(interrupt)

    def __call__(self, cfg: RunConfig, out_dir, resume: bool = False, progress: bool = True):
        ident = cfg.identity()
        self.calls.append((ident, resume))
        store = RunStore(out_dir)
        if store.config() is not None and not resume:
            raise ValueError(f"{out_dir} already holds a run")  # as the real loop refuses
        if store.config() is None:
            store.start(cfg.to_dict(), ident, command=["fake"])
        for t in range(len(store.metrics()) + 1, cfg.rounds + 1):
            if t == 2 and ident in self.interrupt:
                self.interrupt.discard(ident)
                raise KeyboardInterrupt("simulated Ctrl-C")
            if t == 2 and ident in self.fail:
                self.fail.discard(ident)
                raise RuntimeError("simulated failure")
            store.append_metrics({"round": t, "bytes_up": 10, "bytes_down": 10, "server_seconds": 0.1})
        summary = {"final": {"accuracy": 0.5}, "main_metric": "accuracy", "wall_seconds": 30.0, "identity": ident}
        store.finish(summary)
        return summary


def _sweep(grid, results, fake, monkeypatch, **kwargs):
    monkeypatch.setattr(sweep_mod, "run_federation", fake)
    preset = load_preset(grid)
    runs = expand(preset, **kwargs)
    return runs, run_sweep(preset, runs, results, command="test", progress=False, console=Console(file=io.StringIO()))


def test_expansion_dedupes_and_orders_seeds_first(grid):
    runs = expand(load_preset(grid))
    # Per seed: glora and fedit in iid and skew, glora-energy, and one centralized run for both
    # partitions (it pools the data, so the partition does not apply to it).
    assert len(runs) == 2 * (2 + 2 + 1 + 1)
    assert [r.labels[0].seed for r in runs] == [0] * 6 + [1] * 6
    central = [r for r in runs if r.config.rule == "centralized"]
    assert [[lab.setting for lab in r.labels] for r in central] == [["iid", "skew"]] * 2
    assert central[0].config.alpha is None
    energy = [r for r in runs if r.labels[0].setting == "energy"]
    assert [r.config.rule_options for r in energy] == [{"consensus": "energy"}] * 2
    assert len({r.identity for r in runs}) == len(runs)
    assert {r.config.alpha for r in runs if r.labels[0].setting == "skew"} == {0.5}


def test_expansion_checks_every_config_and_filter(tmp_path, grid):
    bad = tmp_path / "bad.toml"
    bad.write_text(GRID.replace('ranks = "8"', 'ranks = "2,4"'))
    with pytest.raises(ValueError, match=r"'rule': 'fedit'.*needs equal client ranks"):
        expand(load_preset(bad))
    with pytest.raises(ValueError, match=r"rules \['flora'\] not in preset"):
        expand(load_preset(grid), rules=["flora"])
    assert {r.config.rule for r in expand(load_preset(grid), rules=["fedit"])} == {"fedit"}
    typo = tmp_path / "typo.toml"
    typo.write_text(GRID.replace("rounds = 2", "roundz = 2"))
    with pytest.raises(ValueError, match=r"unknown config keys \['roundz'\]"):
        expand(load_preset(typo))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_rerun_skips_finished_runs_and_records_a_failure(tmp_path, grid, monkeypatch):
    results = tmp_path / "results"
    planned = expand(load_preset(grid))
    broken = planned[3].identity
    fake = FakeRuns(fail=[broken])
    runs, outcome = _sweep(grid, results, fake, monkeypatch)
    # The failure is recorded and the sweep went on to every later run.
    assert [i for i, _ in fake.calls] == [r.identity for r in runs]
    assert list(outcome.failed) == [broken] and "simulated failure" in (results / broken / ERROR).read_text()
    assert run_status(results / broken) == "failed"
    assert all(run_status(results / r.identity) == "finished" for r in runs if r.identity != broken)

    again = FakeRuns()
    _, outcome = _sweep(grid, results, again, monkeypatch)
    # Only the failed run runs again, resumed from its round-1 checkpoint; nothing is repeated.
    assert again.calls == [(broken, True)]
    assert len(outcome.skipped) == len(runs) - 1
    assert not (results / broken / ERROR).exists()
    assert len((results / broken / "metrics.jsonl").read_text().splitlines()) == 2

    third = FakeRuns()
    _sweep(grid, results, third, monkeypatch)
    assert third.calls == []


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, grid, monkeypatch):
    results = tmp_path / "results"
    planned = expand(load_preset(grid))
    stop = 4
    fake = FakeRuns(interrupt=[planned[stop].identity])
    with pytest.raises(KeyboardInterrupt):
        _sweep(grid, results, fake, monkeypatch)
    assert [i for i, _ in fake.calls] == [r.identity for r in planned[: stop + 1]]
    assert not any((results / r.identity).exists() for r in planned[stop + 1 :])

    resumed = FakeRuns()
    _sweep(grid, results, resumed, monkeypatch)
    expected = [(planned[stop].identity, True)] + [(r.identity, False) for r in planned[stop + 1 :]]
    assert resumed.calls == expected


def test_parallel_sweeps_share_the_grid(tmp_path, grid, monkeypatch):
    results = tmp_path / "results"
    planned = expand(load_preset(grid))
    results.mkdir()
    # Another sweep of the same grid holds run 2: this one leaves it alone and runs the rest.
    with sweep_mod._claim(results, planned[2].identity) as mine:
        assert mine
        fake = FakeRuns()
        _, outcome = _sweep(grid, results, fake, monkeypatch)
    assert outcome.busy == [planned[2].identity]
    assert [i for i, _ in fake.calls] == [r.identity for r in planned if r is not planned[2]]
    again = FakeRuns()
    _sweep(grid, results, again, monkeypatch)
    assert again.calls == [(planned[2].identity, False)]


def test_reuse_links_finished_runs_of_another_sweep_and_runs_the_rest(tmp_path, grid, monkeypatch):
    other = tmp_path / "other"
    planned = expand(load_preset(grid))
    broken = planned[1].identity
    _sweep(grid, other, FakeRuns(fail=[broken]), monkeypatch, seeds=[0])
    monkeypatch.setattr(sweep_mod, "run_federation", fake := FakeRuns())
    results = tmp_path / "results"
    sweep_command(
        load_preset(grid), results, "test", reuse_from=[other], progress=False, console=Console(file=io.StringIO())
    )
    seed0 = [r.identity for r in planned if r.labels[0].seed == 0]
    # Seed 0's finished runs are links to the other sweep's folders; its failed run and all of
    # seed 1 ran here.
    assert [i for i, _ in fake.calls] == [broken] + [r.identity for r in planned if r.labels[0].seed == 1]
    linked = [i for i in seed0 if i != broken]
    assert all((results / i).is_symlink() and (results / i).resolve() == (other / i).resolve() for i in linked)
    assert not (results / broken).is_symlink()
    report = load_results(results)
    assert all(r.status == "finished" for r in report.runs)
    assert report.index["commands"] == ["test"]  # the caller's command, as given
    assert sorted(r.identity for r in report.runs if r.linked) == sorted(linked)
    assert f"{len(linked)} of them" in markdown(report, {})
    with pytest.raises(ValueError, match="no such folder"):
        sweep_command(load_preset(grid), results, "test", reuse_from=[tmp_path / "nothing"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run folders"):
        sweep_command(load_preset(grid), results, "test", reuse_from=[tmp_path / "empty"], progress=False)


def test_reuse_links_runs_of_glora_run_by_their_config_not_their_folder_name(tmp_path, grid, monkeypatch):
    other = tmp_path / "other"
    planned = expand(load_preset(grid))
    _sweep(grid, other, FakeRuns(), monkeypatch, seeds=[0])
    # `glora run --out` folders under names of the user's choosing; one of them unfinished.
    runs = tmp_path / "runs"
    runs.mkdir()
    named = {}
    for k, run in enumerate(r for r in planned if r.labels[0].seed == 0):
        named[run.identity] = runs / f"my-run-{k}"
        shutil.copytree(other / run.identity, named[run.identity])
    unfinished = planned[0].identity
    (named[unfinished] / SUMMARY).unlink()
    monkeypatch.setattr(sweep_mod, "run_federation", fake := FakeRuns())
    results = tmp_path / "results"
    sweep_command(
        load_preset(grid),
        results,
        "test",
        seeds=[0],
        reuse_from=[runs],
        progress=False,
        console=Console(file=io.StringIO()),
    )
    assert [i for i, _ in fake.calls] == [unfinished]
    linked = [i for i in named if i != unfinished]
    assert all((results / i).resolve() == named[i].resolve() for i in linked)
    assert not (results / unfinished).is_symlink()
    (named[unfinished] / SUMMARY).write_text("{}")
    (named[unfinished] / "config.json").write_text('{"lr": 0.001, "not_a_field": 1}')
    with pytest.raises(ValueError, match=r"my-run-0/config.json is not a run's config .*not_a_field"):
        sweep_command(
            load_preset(grid), results, "test", reuse_from=[runs], progress=False, console=Console(file=io.StringIO())
        )


def test_reuse_links_a_centralized_run_made_with_the_clients_ranks_and_partition(tmp_path, grid, monkeypatch):
    """The centralized reference trains one client on every example at the largest rank, so a
    `glora run --rule centralized --ranks 2,4,8 --alpha 0.1` computes the grid's centralized cell
    (IID, rank 8): it is linked, not run again. One that differs where the run does look (its
    learning rate) is not."""
    planned = {(r.labels[0].rule, r.labels[0].seed): r.config for r in expand(load_preset(grid))}
    runs = tmp_path / "runs"
    made = {
        "seed-0": planned["centralized", 0].replace(ranks="2,4,8", alpha=0.1),
        "seed-1-other-lr": planned["centralized", 1].replace(ranks="2,4,8", alpha=0.1, lr=1e-2),
    }
    for name, cfg in made.items():
        RunStore(runs / name).start(cfg.to_dict(), cfg.identity(), command=["glora", "run"])
        RunStore(runs / name).finish({"final": {"accuracy": 0.9}, "main_metric": "accuracy", "wall_seconds": 1.0})
    monkeypatch.setattr(sweep_mod, "run_federation", fake := FakeRuns())
    results = tmp_path / "results"
    sweep_command(
        load_preset(grid), results, "test", reuse_from=[runs], progress=False, console=Console(file=io.StringIO())
    )
    ran = [i for i, _ in fake.calls]
    central = {seed: planned["centralized", seed].identity() for seed in (0, 1)}
    assert (results / central[0]).resolve() == (runs / "seed-0").resolve() and central[0] not in ran
    assert not (results / central[1]).is_symlink() and central[1] in ran
    assert len(ran) == len(expand(load_preset(grid))) - 1


def test_index_accumulates_over_seed_by_seed_sweeps(tmp_path, grid, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(sweep_mod, "run_federation", FakeRuns())
    for seed in ("0", "1"):
        out = CliRunner().invoke(app, ["sweep", str(grid), "--results", str(results), "--seeds", seed, "--no-progress"])
        assert out.exit_code == 0, out.output
    index = json.loads((results / INDEX).read_text())
    assert index["preset"] == "tiny-grid"
    assert index["commands"] == [f"glora sweep {grid} --results {results} --seeds {s}" for s in (0, 1)]
    assert len(index["runs"]) == 12
    # Each run names the one invocation whose grid held it: its seed's.
    for entry in index["runs"].values():
        assert entry["commands"] == [f"glora sweep {grid} --results {results} --seeds {entry['labels'][0]['seed']}"]
    central = [e for e in index["runs"].values() if e["labels"][0]["rule"] == "centralized"]
    assert sorted((lab["setting"], lab["seed"]) for e in central for lab in e["labels"]) == [
        ("iid", 0),
        ("iid", 1),
        ("skew", 0),
        ("skew", 1),
    ]
    other = tmp_path / "other.toml"
    other.write_text(GRID.replace('name = "tiny-grid"', 'name = "other"'))
    with pytest.raises(ValueError, match="holds a sweep of preset 'tiny-grid'"):
        sweep_command(load_preset(other), results, "test", progress=False, console=Console(file=io.StringIO()))


def test_the_cli_records_the_options_that_choose_the_runs(tmp_path, grid, monkeypatch):
    """The command in sweep.json is built by the CLI: the grid's options in a fixed order and
    spelling, the results folder spelled out (the default one too), --threads and --no-progress
    left out (they change how the runs go, not which)."""
    _sweep(grid, tmp_path / "other", FakeRuns(), monkeypatch, seeds=[0])
    monkeypatch.setattr(sweep_mod, "run_federation", FakeRuns())
    monkeypatch.chdir(tmp_path)
    args = ["--only-settings", "iid, skew", "--threads", "1", "--seeds", "0", "--only-rules", "glora,fedit"]
    args += ["--reuse-from", "other/", "--report-to", "tensorboard", "--no-progress", "--only-tasks", "sst2"]
    out = CliRunner().invoke(app, ["sweep", str(grid), *args])
    assert out.exit_code == 0, out.output
    index = json.loads((tmp_path / "runs" / "sweeps" / "tiny-grid" / INDEX).read_text())
    assert index["commands"] == [
        f"glora sweep {grid} --results runs/sweeps/tiny-grid --seeds 0 --only-rules glora,fedit --only-tasks sst2 "
        "--only-settings iid,skew --reuse-from other --report-to tensorboard"
    ]


def test_progress_bars_follow_the_runs(tmp_path, grid, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_federation", FakeRuns())
    buf = io.StringIO()
    outcome = sweep_command(
        load_preset(grid),
        tmp_path / "r",
        "test",
        seeds=[0],
        console=Console(file=buf, force_terminal=True, width=120, highlight=False),
    )
    assert len(outcome.ran) == 6
    text = buf.getvalue()
    assert "grid" in text and "glora on sst2" in text  # the grid bar and a run's round bar were drawn
    assert "6 ran, 0 already finished, 0 left to another sweep, 0 failed" in text


def test_time_left_scales_estimates_by_finished_runs(tmp_path, grid, monkeypatch):
    results = tmp_path / "results"
    runs, _ = _sweep(grid, results, FakeRuns(), monkeypatch, seeds=[0])
    all_runs = expand(load_preset(grid))
    clock = TimeLeft(all_runs, results)
    # Each fake run reports 30 s of wall time: the ratio is 30 s over the runs' estimates.
    assert clock.ratio == pytest.approx(30.0 * len(runs) / sum(r.estimate_seconds for r in runs))
    pending = [r.identity for r in all_runs[len(runs) :]]
    full = clock.ratio * sum(r.estimate_seconds for r in all_runs[len(runs) :])
    assert clock.left(pending) == pytest.approx(full)
    half = clock.left(pending, current_done=0.5)
    assert half == pytest.approx(full - clock.ratio * 0.5 * all_runs[len(runs)].estimate_seconds)
    assert TimeLeft(all_runs, tmp_path / "empty").ratio == 1.0


def test_time_left_leaves_out_runs_made_on_another_device(tmp_path, grid, monkeypatch):
    """A GPU's runs say nothing about this CPU's speed: a sweep continued here scales its
    estimates by the runs made here only, whether meta.json names the device or (older runs)
    only the torch build does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "results"
    runs, _ = _sweep(grid, results, FakeRuns(), monkeypatch, seeds=[0])
    all_runs = expand(load_preset(grid))
    here = TimeLeft(all_runs, results)
    assert here.elsewhere == 0 and here.ratio > 0
    gpu_new, gpu_old, cpu_old = (results / r.identity / "meta.json" for r in runs[:3])
    gpu_new.write_text(json.dumps({"device": "cuda", "torch": "2.13.0+cpu"}))
    gpu_old.write_text(json.dumps({"torch": "2.11.0+cu130"}))
    cpu_old.write_text(json.dumps({"torch": "2.13.0+cpu"}))
    for r in runs[3:]:  # these took twice as long as the runs left in the estimate
        summary = results / r.identity / "summary.json"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "wall_seconds": 60.0}))
    clock = TimeLeft(all_runs, results)
    assert clock.elsewhere == 2
    kept = [runs[2], *runs[3:]]
    assert clock.ratio == pytest.approx((30.0 + 60.0 * len(runs[3:])) / sum(r.estimate_seconds for r in kept))
    buf = io.StringIO()
    print_plan(all_runs, results, Console(file=buf, width=200))
    assert "2 finished runs made on another kind of device left out" in buf.getvalue()


def test_run_device_reads_meta_or_the_torch_build():
    assert run_device({"device": "cuda", "torch": "2.13.0+cpu"}) == "cuda"
    assert run_device({"torch": "2.11.0+cu130"}) == "cuda"
    assert run_device({"torch": "2.13.0+cpu"}) == "cpu"
    assert run_device({"torch": "2.13.0"}) is None  # a build without a tag says nothing
    assert run_device({}) is None


def test_estimate_by_hand():
    cost = CostModel(step_seconds=0.4, eval_example_seconds=0.004, eval_examples={"sst2": 872}, setup_seconds=20)
    cfg = RunConfig(task="sst2", rule="glora", clients=10, ranks="2,4,8,16", rounds=10, local_steps=10, eval_every=5)
    # 10 rounds x (10 clients x 10 steps x 0.4 s + 1 s) + 2 evaluations x (global + 4 ranks) x 872 x 0.004 s + 20 s.
    assert estimate_seconds(cfg, cost) == pytest.approx(10 * (40 + 1) + 2 * 5 * 872 * 0.004 + 20)
    # The centralized reference pools everything into one client of the largest rank: one model to evaluate.
    central = cfg.replace(rule="centralized")
    assert estimate_seconds(central, cost) == pytest.approx(10 * (40 + 1) + 2 * 1 * 872 * 0.004 + 20)
    # At one client's budget it trains for one client's steps a round.
    steps = cfg.replace(rule="centralized-steps")
    assert estimate_seconds(steps, cost) == pytest.approx(10 * (4 + 1) + 2 * 1 * 872 * 0.004 + 20)
    # Under local epochs the pooled client takes epochs over all the pooled data, whatever the
    # fraction sampled (as federation.engine.client_steps counts them): 3,200 / 32 = 100 steps.
    epochs = central.replace(fraction=0.5, local_epochs=1.0, max_train_examples=3200, rounds=2, eval_every=2)
    assert client_steps(epochs, RULES["centralized"](), 3200) == 100
    assert estimate_seconds(epochs, cost) == pytest.approx(2 * (100 * 0.4 + 1) + 1 * 872 * 0.004 + 20)
    # Sparse participation: 5 of 50 clients a round, twice the rounds, the same local steps in all.
    sparse = cfg.replace(clients=50, fraction=0.1, rounds=20, ranks="8", eval_every=10)
    assert estimate_seconds(sparse, cost) == pytest.approx(20 * (20 + 1) + 2 * 872 * 0.004 + 20)


@pytest.mark.parametrize("name", packaged_presets())
def test_packaged_presets_expand_and_state_their_cost(name):
    preset = load_preset(name)
    runs = expand(preset)
    header = re.search(r"# Runs: (\d+)\. Estimated time: ([0-9.]+) h", load_text(name))
    assert header, f"{name}.toml must state its run count and estimated time"
    assert int(header.group(1)) == len(runs)
    assert float(header.group(2)) == pytest.approx(sum(r.estimate_seconds for r in runs) / 3600, abs=0.051)
    headline = {"data-heterogeneity", "resource-heterogeneity", "sparse-participation"}
    if name in headline:
        assert len(preset.seeds) >= 3 and set(preset.tasks) == {"sst2", "cola"}
        assert {"centralized", "local"} <= set(preset.all_rules())


def load_text(name: str) -> str:
    from importlib import resources

    return resources.files("glora.experiments.grid").joinpath("presets", f"{name}.toml").read_text()


def test_gauge_control_preset_keeps_fedit_at_equal_rank():
    runs = expand(load_preset("controls"), settings=["gauge-on"])
    assert {r.config.rule for r in runs} == {"glora", "flora", "flexlora", "fedit", "hetlora"}
    assert all(r.config.random_gauge and r.config.ranks == "8" for r in runs)


def test_server_rank_variants_differ_from_their_partners_only_in_the_server_rank():
    preset = load_preset("server-rank")
    variants = {name: s.versus for name, s in preset.settings.items() if s.versus}
    assert set(variants) == {name for name in preset.settings if name.endswith("-2x")}
    for variant, partner in variants.items():
        mine = {r.labels[0].seed: r.config for r in expand(preset, settings=[variant], rules=["glora"])}
        theirs = {r.labels[0].seed: r.config for r in expand(preset, settings=[partner], rules=["glora"])}
        assert set(mine) == set(theirs) == {0, 1, 2}
        for seed, config in mine.items():
            largest = {"8": 8, "2,4,8,16": 16, "skewed": 16}[theirs[seed].ranks]  # the skewed split: 2 to 16
            assert theirs[seed].rule_options == {"rank": "max"}  # the default of the recorded runs
            assert config == theirs[seed].replace(rule_options={"rank": 2 * largest})


def test_a_variant_setting_names_another_setting_and_reaches_the_index(tmp_path, monkeypatch):
    def energy_versus(partner):
        """The tiny grid with its energy setting a variant of ``partner``."""
        path = tmp_path / f"versus-{partner}.toml"
        energy = 'rule_options = { consensus = "energy" }'
        path.write_text(GRID.replace(energy, f'{energy}\nversus = "{partner}"'))
        return path

    with pytest.raises(ValueError, match="versus = 'skw', which names no other setting"):
        load_preset(energy_versus("skw"))
    good = energy_versus("skew")
    results = tmp_path / "results"
    _sweep(good, results, FakeRuns(), monkeypatch, seeds=[0])
    settings = json.loads((results / INDEX).read_text())["settings"]
    assert settings["energy"]["versus"] == "skew" and "versus" not in settings["iid"]


@pytest.mark.slow
def test_smoke_sweep_and_report_end_to_end(tmp_path):
    results = tmp_path / "smoke"
    runner = CliRunner()
    out = runner.invoke(app, ["sweep", "smoke", "--results", str(results), "--no-progress"])
    assert out.exit_code == 0, out.output
    index = json.loads((results / INDEX).read_text())
    assert len(index["runs"]) == 2
    for identity in index["runs"]:
        summary = json.loads((results / identity / "summary.json").read_text())
        assert summary["identity"] == identity and set(summary["final_by_rank"]) == {"2", "4"}
    again = runner.invoke(app, ["sweep", "smoke", "--results", str(results), "--no-progress"])
    assert again.exit_code == 0 and "0 ran, 2 already finished" in again.output
    out = runner.invoke(app, ["report", str(results)])
    assert out.exit_code == 0, out.output
    md = (results / "report.md").read_text()
    assert "| glora |" in md and "| flexlora |" in md and "rank 4" in md
    assert (results / "plots" / "final_sst2.png").exists()
