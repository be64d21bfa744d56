"""Sweeps: run a preset's grid one run after another, into one results folder.

Each run's folder is named by its config identity, so a sweep can always be re-run: a
finished run (its summary.json exists) is skipped, an interrupted one (config.json without
a summary) is resumed from its last checkpoint, and a failing one is recorded in its
``error.txt`` while the sweep goes on. ``sweep.json`` in the results folder records the
preset, the commands that ran it and, for every run, the grid cells (labels) it fills, so
``glora report`` can build the tables.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from glora.experiments.grid import PlannedRun, Preset, canonical, expand, load_preset
from glora.federation.config import RunConfig
from glora.federation.results import CONFIG, METRICS, SUMMARY, RunStore, run_device, write_json
from glora.federation.simulation import run_federation
from glora.models.device import device_kind

INDEX = "sweep.json"
ERROR = "error.txt"
FINISHED, INTERRUPTED, FAILED, TODO = "finished", "interrupted", "failed", "to run"


def run_status(folder: Path) -> str:
    """finished (summary.json), failed (error.txt), interrupted (config.json only) or to run."""
    if (folder / SUMMARY).exists():
        return FINISHED
    if (folder / ERROR).exists():
        return FAILED
    if (folder / CONFIG).exists():
        return INTERRUPTED
    return TODO


def format_duration(seconds: float) -> str:
    """'2h 05m', '7m 30s', '45s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def write_index(results_dir: Path, preset: Preset, runs: list[PlannedRun], command: str) -> dict[str, Any]:
    """Create or extend ``sweep.json``: runs and commands accumulate over invocations (a
    sweep run seed by seed keeps one index). ValueError if the folder holds another preset."""
    path = results_dir / INDEX
    results_dir.mkdir(parents=True, exist_ok=True)
    with _index_lock(results_dir):
        return _update_index(path, preset, runs, command)


def _update_index(path: Path, preset: Preset, runs: list[PlannedRun], command: str) -> dict[str, Any]:
    results_dir = path.parent
    old = json.loads(path.read_text()) if path.exists() else None
    if old is not None and old["preset"] != preset.name:
        raise ValueError(
            f"{results_dir} holds a sweep of preset {old['preset']!r}, not {preset.name!r}; "
            "give each preset its own --results folder"
        )
    entries = dict(old["runs"]) if old else {}
    for run in runs:
        labels = list(entries.get(run.identity, {}).get("labels", []))
        labels += [lab.to_dict() for lab in run.labels if lab.to_dict() not in labels]
        # The invocations whose grid holds the run, so a report table names the commands behind
        # its own runs rather than every command the folder has seen.
        covering = list(entries.get(run.identity, {}).get("commands", []))
        covering += [command] if command not in covering else []
        entries[run.identity] = {
            "labels": labels,
            "estimate_seconds": round(run.estimate_seconds, 1),
            "commands": covering,
        }
    commands = list(old["commands"]) if old else []
    if command not in commands:
        commands.append(command)
    index = {
        "preset": preset.name,
        "description": preset.description,
        "source": preset.source,
        "commands": commands,
        "axes": {
            "tasks": list(preset.tasks),
            "settings": list(preset.settings),
            "rules": list(preset.all_rules()),
            "seeds": list(preset.seeds),
        },
        "settings": {
            s.name: {"note": s.note, "overrides": s.overrides, **({"versus": s.versus} if s.versus else {})}
            for s in preset.settings.values()
        },
        "runs": entries,
    }
    write_json(path, index)
    return index


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before (or by another sweep meanwhile)
    busy: list[str] = field(default_factory=list)  # being run by another sweep
    failed: dict[str, str] = field(default_factory=dict)


class TimeLeft:
    """Time left in a grid: the runs' estimates, scaled by how the finished runs' time
    compared with their estimates (1 before any has finished). Runs finished before this
    sweep count with their recorded wall time (which leaves out model loading), runs of this
    sweep with the time their call took. Runs finished on another kind of device (a GPU's
    runs, for a sweep continued on a CPU) say nothing about this machine's speed and are left
    out (``elsewhere`` counts them)."""

    def __init__(self, runs: list[PlannedRun], results_dir: Path) -> None:
        self.estimates = {r.identity: r.estimate_seconds for r in runs}
        self.wall = 0.0
        self.estimated = 0.0
        self.elsewhere = 0
        for r in runs:
            store = RunStore(results_dir / r.identity)
            summary = store.summary()
            if summary is None:
                continue
            made_on = run_device(store.meta() or {})
            if made_on is not None and made_on != device_kind(r.config.device):
                self.elsewhere += 1
                continue
            self.add(r.identity, summary["wall_seconds"])

    def add(self, identity: str, wall_seconds: float) -> None:
        self.wall += wall_seconds
        self.estimated += self.estimates[identity]

    @property
    def ratio(self) -> float:
        return self.wall / self.estimated if self.estimated > 0 else 1.0

    def left(self, pending: list[str], current_done: float = 0.0) -> float:
        """Seconds left for the ``pending`` runs, the first of which is ``current_done`` (0..1) done."""
        total = sum(self.estimates[i] for i in pending)
        if pending:
            total -= current_done * self.estimates[pending[0]]
        return self.ratio * total


class _GridProgress:
    """A bar over the grid and one over the current run's rounds. Runs report nothing to
    the sweep while they train, so the round bar follows the run's metrics.jsonl."""

    def __init__(self, console: Console, total: int, done: int, clock: TimeLeft) -> None:
        self.clock = clock
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            console=console,
        )
        self.grid = self.progress.add_task("grid", total=total, completed=done, left="")
        self.rounds: TaskID | None = None

    @contextmanager
    def watch(self, run: PlannedRun, folder: Path, pending: list[str]) -> Iterator[None]:
        desc = f"  {run.config.rule} on {run.config.task} ({run.identity})"
        self.rounds = self.progress.add_task(desc, total=run.config.rounds, left="")
        stop = threading.Event()

        def poll() -> None:
            while True:
                self._update(folder, run.config.rounds, pending)
                if stop.wait(1.0):
                    return

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.progress.remove_task(self.rounds)
            self.rounds = None

    def _update(self, folder: Path, rounds: int, pending: list[str]) -> None:
        path = folder / METRICS
        done = len(path.read_text().splitlines()) if path.exists() else 0
        self.progress.update(self.rounds, completed=done)
        left = self.clock.left(pending, min(done / rounds, 1.0))
        self.progress.update(self.grid, left=f"~{format_duration(left)} left")

    def advance(self, pending: list[str]) -> None:
        left = f"~{format_duration(self.clock.left(pending))} left" if pending else "done"
        self.progress.update(self.grid, advance=1, left=left)


def run_sweep(
    preset: Preset,
    runs: list[PlannedRun],
    results_dir: Path,
    command: str,
    progress: bool = True,
    console: Console | None = None,
) -> SweepOutcome:
    """Run every planned run that has not finished, in order; see the module docstring."""
    console = console or Console(stderr=True)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_index(results_dir, preset, runs, command)
    clock = TimeLeft(runs, results_dir)
    outcome = SweepOutcome()
    pending = [r.identity for r in runs if run_status(results_dir / r.identity) != FINISHED]
    bar = _GridProgress(console, len(runs), len(runs) - len(pending), clock) if progress else None
    with bar.progress if bar is not None else _nothing():
        for run in runs:
            folder = results_dir / run.identity
            with _claim(results_dir, run.identity) as mine:
                if run.identity not in pending or run_status(folder) == FINISHED:
                    outcome.skipped.append(run.identity)
                elif not mine:
                    outcome.busy.append(run.identity)
                    console.print(f"skipped {_describe(run)}: another sweep is running it")
                else:
                    with bar.watch(run, folder, pending) if bar is not None else _nothing():
                        _run_one(run, folder, console, outcome, clock)
            if run.identity in pending:
                pending.remove(run.identity)
                if bar is not None:
                    bar.advance(pending)
    return outcome


def _run_one(run: PlannedRun, folder: Path, console: Console, outcome: SweepOutcome, clock: TimeLeft) -> None:
    """Run or resume one run; a failure is written to its error.txt, not raised."""
    what = _describe(run)
    started = time.perf_counter()
    try:
        summary = run_federation(run.config, folder, resume=(folder / CONFIG).exists(), progress=False)
    except Exception as e:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERROR).write_text(traceback.format_exc())
        outcome.failed[run.identity] = f"{type(e).__name__}: {e}"
        console.print(f"[red]failed[/red] {what}: {type(e).__name__}: {e} (see {folder / ERROR})")
        return
    (folder / ERROR).unlink(missing_ok=True)
    outcome.ran.append(run.identity)
    clock.add(run.identity, time.perf_counter() - started)  # model loading included
    metric = summary.get("main_metric")
    value = (summary.get("final") or {}).get(metric)
    score = f"{metric} {value:.4f}" if value is not None else "no metric"
    console.print(f"done {what}: {score} in {format_duration(summary['wall_seconds'])}")


@contextmanager
def _claim(results_dir: Path, identity: str) -> Iterator[bool]:
    """Try to take an exclusive lock on one run (fcntl.flock, released when the process
    ends): several sweeps of one grid, e.g. one per CPU core with --threads 1, then share
    the runs instead of repeating them. Yields whether this process holds the run."""
    locks = results_dir / ".locks"
    locks.mkdir(exist_ok=True)
    with (locks / identity).open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _index_lock(results_dir: Path) -> Iterator[None]:
    """Serialises sweep.json's read-modify-write between sweeps sharing a results folder."""
    with (results_dir / ".sweep.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _describe(run: PlannedRun) -> str:
    settings = "+".join(dict.fromkeys(lab.setting for lab in run.labels))
    seeds = ",".join(str(s) for s in dict.fromkeys(lab.seed for lab in run.labels))
    return f"{run.config.rule} / {run.config.task} / {settings} / seed {seeds} ({run.identity})"


def print_plan(runs: list[PlannedRun], results_dir: Path, console: Console) -> float:
    """The dry run: every run with its status and estimate; returns the estimated seconds left."""
    table = Table(title=f"{len(runs)} runs into {results_dir}")
    for col in ("#", "identity", "task", "setting", "rule", "seed", "status", "estimate"):
        table.add_column(
            col, justify="right" if col in ("#", "seed", "estimate") else "left", no_wrap=col == "identity"
        )
    pending = []
    for i, run in enumerate(runs, 1):
        status = run_status(results_dir / run.identity)
        if status != FINISHED:
            pending.append(run.identity)
        table.add_row(
            str(i),
            run.identity,
            run.config.task,
            "+".join(dict.fromkeys(lab.setting for lab in run.labels)),
            run.config.rule,
            ",".join(str(s) for s in dict.fromkeys(lab.seed for lab in run.labels)),
            status,
            format_duration(run.estimate_seconds),
        )
    console.print(table)
    clock = TimeLeft(runs, results_dir)
    left = clock.left(pending)
    if clock.estimated > 0:
        basis = f"the preset's estimates x {clock.ratio:.2f}, the finished runs' time over their estimates"
    elif clock.elsewhere:
        basis = "the preset's per-step estimates"
    else:
        basis = "the preset's per-step estimates; no run has finished yet"
    if clock.elsewhere:
        basis += f"; {clock.elsewhere} finished runs made on another kind of device left out"
    console.print(
        f"{len(runs) - len(pending)} finished, {len(pending)} to run; estimated time left {format_duration(left)} "
        f"({basis})"
    )
    return left


def with_tuned_lrs(runs: list[PlannedRun], lrs: dict, source: Path) -> list[PlannedRun]:
    """The runs with the tuned learning rate of their task ({task: lr}) or of their task and
    rule ({(task, rule): lr}); ValueError for a task or rule the tuning lacks."""
    per_rule = any(isinstance(k, tuple) for k in lrs)

    def key(run: PlannedRun):
        return (run.config.task, run.config.rule) if per_rule else run.config.task

    missing = sorted({key(r) for r in runs} - set(lrs), key=str)
    if missing:
        tuned = ", ".join("/".join(k) if isinstance(k, tuple) else k for k in sorted(lrs, key=str))
        names = ", ".join("/".join(k) if isinstance(k, tuple) else k for k in missing)
        raise ValueError(
            f"--lr-from {source} has no tuned learning rate for {names} (it tuned {tuned or 'nothing'}); tune "
            "those too or leave them out with --only-tasks / --only-rules"
        )
    for run in runs:
        run.config = run.config.replace(lr=lrs[key(run)])
    return runs


def finished_runs(source: Path) -> dict[str, Path]:
    """The finished runs in ``source`` by identity: a sweep's results folder (one folder per
    identity) or any folder of ``glora run --out`` folders. The identity is recomputed from each
    run's config.json made canonical (``grid.canonical``), so a run made by ``glora run`` that
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
    preset_arg: str,
    results: Path | None = None,
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
    """``glora sweep``: load, expand, then list (dry run) or run. Returns None for a dry run.
    ``lr_from``: a tuning sweep's results folder whose chosen rate per task replaces the
    preset's learning rate in every run (:mod:`glora.experiments.tuned`; with ``lr_per_rule``,
    each rule's own chosen rate). ``reuse_from``:
    other sweeps' results folders whose finished runs of the same identity are linked, not
    re-run (:func:`reuse_finished`); a dry run lists them as to run."""
    preset = load_preset(preset_arg)
    runs = expand(preset, seeds=seeds, rules=rules, tasks=tasks, settings=settings)
    if lr_from is not None:
        # imported here: tuned reads results through sweep_results, which imports this module
        from glora.experiments.tuned import tuned_lrs_from

        runs = with_tuned_lrs(runs, tuned_lrs_from(lr_from, per_rule=lr_per_rule), lr_from)
    if threads is not None:
        # Threads are not part of a run's identity: they change its speed, not its result.
        for run in runs:
            run.config = run.config.replace(threads=threads)
    if report_to:
        for run in runs:  # trackers are not part of a run's identity either
            run.config = run.config.replace(report_to=report_to)
    results_dir = results or Path("runs") / "sweeps" / preset.name
    if dry_run:
        print_plan(runs, results_dir, Console() if console is None else console)
        return None
    parts = ["glora", "sweep", str(preset_arg), "--results", str(results_dir)]
    filters = (
        ("--seeds", seeds),
        ("--only-rules", rules),
        ("--only-tasks", tasks),
        ("--only-settings", settings),
        ("--lr-from", [lr_from] if lr_from is not None else None),
        ("--reuse-from", reuse_from),
    )
    for flag, values in filters:
        if values:
            parts += [flag, ",".join(str(v) for v in values)]
    if lr_per_rule:
        parts.append("--lr-per-rule")
    if report_to:
        parts += ["--report-to", report_to]
    console = console or Console(stderr=True)
    if reuse_from:
        linked = reuse_finished(runs, results_dir, reuse_from)
        console.print(f"linked {len(linked)} finished runs from {', '.join(str(p) for p in reuse_from)}")
    try:
        outcome = run_sweep(preset, runs, results_dir, shlex.join(parts), progress=progress, console=console)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/yellow]: finished runs are kept; this command resumes from the last checkpoint:\n"
            f"  {shlex.join(parts)}",
            soft_wrap=True,
        )
        raise
    console.print(
        f"sweep {preset.name}: {len(outcome.ran)} ran, {len(outcome.skipped)} already finished, "
        f"{len(outcome.busy)} left to another sweep, {len(outcome.failed)} failed; "
        f"results in {results_dir} (glora report {results_dir})"
    )
    return outcome
