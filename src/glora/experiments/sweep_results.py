"""A sweep folder read back: ``sweep.json`` (which grid cells each run fills) and each run
folder's config, summary, per-round metrics and provenance, for the report and the plots.

The folder's layout (the index file, a failed run's error file, the status a run folder is
in) is defined here, the lowest layer: the sweep runner that writes a folder and every
reader of one import it from here, so none of them imports another to agree on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glora.aggregation import RULES
from glora.federation.results import CONFIG, SUMMARY, RunStore, run_device

INDEX = "sweep.json"
ERROR = "error.txt"
FINISHED, INTERRUPTED, FAILED, TODO = "finished", "interrupted", "failed", "to run"
# The reference points of a table (not server rules), as the rules declare them.
REFERENCES = tuple(name for name, rule in RULES.items() if rule.reference)


def run_status(folder: Path) -> str:
    """finished (summary.json), failed (error.txt), interrupted (config.json only) or to run."""
    if (folder / SUMMARY).exists():
        return FINISHED
    if (folder / ERROR).exists():
        return FAILED
    if (folder / CONFIG).exists():
        return INTERRUPTED
    return TODO


@dataclass
class Run:
    """One run folder and the grid cells it fills."""

    identity: str
    labels: list[dict[str, Any]]
    status: str
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    rounds: list[dict[str, Any]]
    error: str | None
    linked: bool = False  # a link to another sweep's run (glora sweep --reuse-from)
    commands: list[str] | None = None  # the sweep commands whose grid holds it (None: not recorded)
    device: str | None = None  # the kind of device it trained on ("cpu", "cuda"; None: not recorded)

    @property
    def device_name(self) -> str:
        return self.device or "not recorded"

    def evaluations(self, metric: str) -> dict[int, float]:
        """The global model's ``metric`` at each round that evaluated it, in round order."""
        return {x["round"]: x["eval"][metric] for x in self.rounds if metric in x.get("eval", {})}


@dataclass
class Results:
    index: dict[str, Any]
    runs: list[Run]

    # -- axes and cells ---------------------------------------------------------------------------
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == FINISHED]

    def axis(self, name: str) -> list[Any]:
        """An axis in the preset's order, then any values only the runs have (sorted)."""
        order = list(self.index["axes"][name])
        seen = {lab[name[:-1]] for r in self.finished() for lab in r.labels}
        return [v for v in order if v in seen] + sorted(seen - set(order))

    def cell(self, task: str, setting: str, rule: str) -> list[tuple[int, Run]]:
        """The finished runs of one cell, with their seeds, sorted by seed."""
        out = []
        for r in self.finished():
            for lab in r.labels:
                if (lab["task"], lab["setting"], lab["rule"]) == (task, setting, rule):
                    out.append((lab["seed"], r))
        return sorted(out, key=lambda x: x[0])

    def settings_of(self, task: str) -> list[str]:
        """The settings with a finished run of ``task``, in axis order."""
        return [s for s in self.axis("settings") if self.runs_of(task, s)]

    def runs_of(self, task: str | None = None, setting: str | None = None) -> list[Run]:
        """Distinct finished runs with a label in ``task`` and/or ``setting``."""

        def fits(lab: dict[str, Any]) -> bool:
            return (task is None or lab["task"] == task) and (setting is None or lab["setting"] == setting)

        return [r for r in self.finished() if any(fits(lab) for lab in r.labels)]

    def main_metric(self, task: str) -> str:
        return next(r.summary["main_metric"] for r in self.runs_of(task=task))


def load_results(results_dir: Path) -> Results:
    """The sweep index and every run it lists. ValueError if the folder holds no sweep."""
    results_dir = Path(results_dir)
    path = results_dir / INDEX
    if not path.exists():
        raise ValueError(f"{results_dir} has no {INDEX}: give the --results folder of a `glora sweep`")
    index = json.loads(path.read_text())
    runs = []
    for identity, entry in sorted(index["runs"].items()):
        folder = results_dir / identity
        status = run_status(folder)
        store = RunStore(folder)
        error = (folder / ERROR).read_text().strip().splitlines()[-1] if status == FAILED else None
        runs.append(
            Run(
                identity,
                entry["labels"],
                status,
                store.config(),
                store.summary(),
                store.metrics(),
                error,
                linked=folder.is_symlink(),
                commands=entry.get("commands"),
                device=run_device(store.meta() or {}),
            )
        )
    _check_one_run_per_cell(runs)
    return Results(index, runs)


def _check_one_run_per_cell(runs: list[Run]) -> None:
    """ValueError if two finished runs claim one cell and seed: the folder then mixes configs
    (typically a preset changed under a results folder), and averaging them would pass two
    configs off as two seeds."""
    owners: dict[tuple[Any, ...], list[str]] = {}
    for r in runs:
        if r.status == FINISHED:
            for lab in r.labels:
                owners.setdefault((lab["task"], lab["setting"], lab["rule"], lab["seed"]), []).append(r.identity)
    clashes = {cell: ids for cell, ids in owners.items() if len(ids) > 1}
    if clashes:
        listed = "; ".join(f"{'/'.join(map(str, cell))}: {', '.join(ids)}" for cell, ids in sorted(clashes.items()))
        raise ValueError(
            f"runs of different configs fill the same cell and seed ({listed}): the preset changed under "
            "this results folder. Move the runs of the old config to a folder of their own (with their "
            "sweep.json entries), or give the new preset its own --results folder"
        )
