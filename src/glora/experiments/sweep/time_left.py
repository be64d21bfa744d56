"""What is left of a grid: each run's status and the time the rest will take, scaled by
how the finished runs' time compared with their estimates. The dry run prints it; the
sweep's progress bars count it down."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from glora.experiments.grid.preset import PlannedRun
from glora.experiments.sweep_results import FINISHED, run_status
from glora.federation.results import RunStore, run_device
from glora.models.device import device_kind


def format_duration(seconds: float) -> str:
    """'2h 05m', '7m 30s', '45s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


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
