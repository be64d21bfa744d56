"""``glora sweep``'s work: expand a preset's grid, give it tuned learning rates, link runs
other sweeps finished, then list it (dry run) or run it. The command line that re-runs it
is built by the CLI, which knows how it was invoked, and only recorded here (in sweep.json
and the interrupt message)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from glora.aggregation import RULES
from glora.experiments.grid.preset import PlannedRun, Preset, canonical, expand
from glora.experiments.grid.tuned import tuned_lrs, tuned_lrs_per_rule, untuned_rules
from glora.experiments.sweep.runner import SweepOutcome, run_sweep
from glora.experiments.sweep.time_left import print_plan
from glora.experiments.sweep_results import FINISHED, load_results, run_status
from glora.federation.config import RunConfig
from glora.federation.results import CONFIG


def with_tuned_lrs(
    runs: list[PlannedRun],
    lrs: dict,
    source: Path,
    lr_tasks: dict[str, str] | None = None,
    progress: dict[tuple[str, str], str] | None = None,
) -> list[PlannedRun]:
    """The runs with the tuned learning rate of their task ({task: lr}) or of their task and
    rule ({(task, rule): lr}; a rule that the tuning sweep in ``source`` does not tune at all
    takes the rate of the rule it declares ``tuned_as``); a task named in ``lr_tasks`` (the
    preset's ``lr_task``) takes the rates of the task it names. ``progress``: the tuning
    sweep's :func:`untuned_rules`, for a rule whose tuning is under way. ValueError for a task
    or rule the tuning lacks, saying how far its tuning is where it is under way."""
    per_rule = any(isinstance(k, tuple) for k in lrs)
    progress = progress or {}

    def key(run: PlannedRun):
        task = (lr_tasks or {}).get(run.config.task, run.config.task)
        if not per_rule:
            return task
        cell = (task, run.config.rule)
        stand_in = RULES[run.config.rule].tuned_as
        return (task, stand_in) if stand_in and cell not in lrs and cell not in progress else cell

    missing = sorted({key(r) for r in runs} - set(lrs), key=str)
    if missing:
        tuned = ", ".join("/".join(k) if isinstance(k, tuple) else k for k in sorted(lrs, key=str))
        names = ", ".join(
            "/".join(k) + (f" ({progress[k]})" if k in progress else "") if isinstance(k, tuple) else k for k in missing
        )
        raise ValueError(
            f"--lr-from {source} has no tuned learning rate for {names} (it tuned {tuned or 'nothing'}); tune "
            "those too (or let their tuning runs finish) or leave them out with --only-tasks / --only-rules"
        )
    for run in runs:
        run.config = run.config.replace(lr=lrs[key(run)])
    return runs


def finished_runs(source: Path) -> dict[str, Path]:
    """The finished runs in ``source`` by identity: a sweep's results folder (one folder per
    identity) or any folder of ``glora run --out`` folders. The identity is recomputed from each
    run's config.json made canonical (``grid.preset.canonical``), so a run made by ``glora run`` that
    computes what a grid cell computes is the run a sweep would make. ValueError where
    ``source`` holds no run folder at all."""
    if not source.is_dir():
        raise ValueError(f"--reuse-from {source}: no such folder; give a sweep's results folder or a folder of runs")
    found: dict[str, Path] = {}
    runs = sorted(p for p in source.iterdir() if (p / CONFIG).exists())
    if not runs:
        raise ValueError(
            f"--reuse-from {source}: holds no run folders (sub-folders with a {CONFIG}); give a sweep's results "
            "folder or a folder of `glora run --out` folders"
        )
    for folder in runs:
        if run_status(folder) == FINISHED:
            try:
                config = RunConfig.from_saved(json.loads((folder / CONFIG).read_text()))
            except ValueError as e:
                raise ValueError(f"--reuse-from {source}: {folder / CONFIG} is not a run's config ({e})") from e
            found.setdefault(canonical(config).identity(), folder)
    return found


def reuse_finished(runs: list[PlannedRun], results_dir: Path, sources: list[Path]) -> list[str]:
    """Link each run not yet in ``results_dir`` to a finished run of the same identity in one
    of ``sources`` (see :func:`finished_runs`), so a cell two presets share is run once. The
    identity is the hash of the resolved config, so the linked run is the run this sweep would
    make. The links are relative (they survive a move of the results tree together). Returns
    the identities linked."""
    found = [finished_runs(source) for source in sources]
    results_dir.mkdir(parents=True, exist_ok=True)
    linked = []
    for run in runs:
        folder = results_dir / run.identity
        if folder.exists() or folder.is_symlink():
            continue
        done = next((f[run.identity] for f in found if run.identity in f), None)
        if done is not None:
            folder.symlink_to(os.path.relpath(done, results_dir))
            linked.append(run.identity)
    return linked


def sweep_command(
    preset: Preset,
    results_dir: Path,
    command: str,
    dry_run: bool = False,
    seeds: list[int] | None = None,
    rules: list[str] | None = None,
    tasks: list[str] | None = None,
    settings: list[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    lr_from: Path | None = None,
    reuse_from: list[Path] | None = None,
    lr_per_rule: bool = False,
    report_to: str = "",
) -> SweepOutcome | None:
    """``glora sweep``: expand, then list (dry run) or run into ``results_dir``. Returns None
    for a dry run. ``command``: the command line that re-runs this sweep, as the caller spells
    it; sweep.json records it and an interrupted sweep prints it. ``lr_from``: a tuning
    sweep's results folder whose chosen rate per task replaces the preset's learning rate in
    every run (:mod:`glora.experiments.grid.tuned`; with ``lr_per_rule``, each rule's own
    chosen rate). ``reuse_from``: other sweeps' results folders whose finished runs of the
    same identity are linked, not re-run (:func:`reuse_finished`); a dry run lists them as to
    run."""
    runs = expand(preset, seeds=seeds, rules=rules, tasks=tasks, settings=settings)
    if lr_from is not None:
        tuning = load_results(lr_from)  # read once: the rates and how far each rule's tuning is
        lrs = tuned_lrs_per_rule(tuning) if lr_per_rule else tuned_lrs(tuning)
        progress = untuned_rules(tuning) if lr_per_rule else None
        runs = with_tuned_lrs(runs, lrs, lr_from, preset.lr_tasks, progress)
    if threads is not None:
        # Threads are not part of a run's identity: they change its speed, not its result.
        for run in runs:
            run.config = run.config.replace(threads=threads)
    if report_to:
        for run in runs:  # trackers are not part of a run's identity either
            run.config = run.config.replace(report_to=report_to)
    if dry_run:
        print_plan(runs, results_dir, Console() if console is None else console)
        return None
    console = console or Console(stderr=True)
    if reuse_from:
        linked = reuse_finished(runs, results_dir, reuse_from)
        console.print(f"linked {len(linked)} finished runs from {', '.join(str(p) for p in reuse_from)}")
    try:
        outcome = run_sweep(preset, runs, results_dir, command, progress=progress, console=console)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/yellow]: finished runs are kept; this command resumes from the last checkpoint:\n"
            f"  {command}",
            soft_wrap=True,
        )
        raise
    console.print(
        f"sweep {preset.name}: {len(outcome.ran)} ran, {len(outcome.skipped)} already finished, "
        f"{len(outcome.busy)} left to another sweep, {len(outcome.failed)} failed; "
        f"results in {results_dir} (glora report {results_dir})"
    )
    return outcome
