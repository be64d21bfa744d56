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

from glora.experiments.grid.preset import PlannedRun, Preset
from glora.experiments.sweep.time_left import TimeLeft, format_duration
from glora.experiments.sweep_results import ERROR, FINISHED, INDEX, run_status
from glora.federation.results import CONFIG, METRICS, write_json
from glora.federation.simulation import run_federation


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
