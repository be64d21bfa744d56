"""The round budget of the headline tables, read from a pilot sweep (``glora budget``;
results/sweeps/PROTOCOL.md, item 3).

The pilot runs a few rules for many rounds and evaluates them every few rounds. Its learning
rate is constant and every round draws its own seeds, so the score at round R of a long run is
the score an R-round run would have. The budget is the smallest candidate R at which every
rule's seed-mean score at R is within ``tolerance`` of its score at 2R: the curves have
flattened. Candidates: the first evaluated round, doubled while 2R is still evaluated (10, 20,
40 for evaluations every 10 rounds up to 80).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glora.experiments.sweep_results import FINISHED, Results


@dataclass(frozen=True)
class Check:
    """One rule at one candidate R: its seed-mean score at R and at 2R."""

    rule: str
    rounds: int
    at_r: float
    at_2r: float
    seeds: int

    @property
    def gain(self) -> float:
        return self.at_2r - self.at_r

    def flat(self, tolerance: float) -> bool:
        # Scores are fractions of a finite evaluation set: a gain of exactly the tolerance
        # (0.824 - 0.814) must not fail on the last bit of a float subtraction.
        return abs(self.gain) <= tolerance + 1e-9


@dataclass(frozen=True)
class Budget:
    """The pilot's checks of one task and setting, and the budget they give (None: no
    candidate passed)."""

    task: str
    setting: str
    metric: str
    tolerance: float
    checks: list[Check]
    rounds: int | None

    @property
    def candidates(self) -> list[int]:
        return sorted({c.rounds for c in self.checks})


def pilot_budget(
    res: Results, task: str, setting: str, tolerance: float = 0.01, candidates: list[int] | None = None
) -> Budget:
    """The budget of one (task, setting) of a finished pilot sweep (see the module docstring).
    Every run the sweep plans for it must have finished, and all of them must share their
    evaluation rounds: ValueError, saying which, otherwise."""
    if tolerance < 0:
        raise ValueError(f"the tolerance is how far the score at R may be from the score at 2R: >= 0, not {tolerance}")

    def here(lab: dict) -> bool:
        return lab["task"] == task and lab["setting"] == setting

    planned = [r for r in res.runs if any(here(lab) for lab in r.labels)]
    if not planned:
        raise ValueError(f"the pilot sweep has no run of task {task!r} in setting {setting!r}")
    waiting = [r.identity for r in planned if r.status != FINISHED]
    if waiting:
        raise ValueError(
            f"the pilot is not finished: {len(waiting)} of {len(planned)} runs of {task}/{setting} still to run or "
            f"failed ({', '.join(waiting[:4])}{', ...' if len(waiting) > 4 else ''}); the budget is read from all "
            "of them"
        )
    metric = res.main_metric(task)
    curves: dict[str, dict[int, dict[int, float]]] = {}
    evaluated: set[tuple[int, ...]] = set()
    for run in planned:
        points = run.evaluations(metric)
        evaluated.add(tuple(points))
        for lab in run.labels:
            if here(lab):
                curves.setdefault(lab["rule"], {})[lab["seed"]] = points
    if len(evaluated) > 1:
        raise ValueError(
            f"the pilot's runs of {task}/{setting} were evaluated at different rounds: {sorted(evaluated)}"
        )
    rounds = list(next(iter(evaluated)))
    if candidates is None:
        candidates = _doubling(rounds)
    missing = [r for r in candidates if r not in rounds or 2 * r not in rounds]
    if missing or not candidates:
        raise ValueError(
            f"the pilot evaluated {task}/{setting} at rounds {rounds}: a candidate R needs evaluations at R and 2R "
            f"(missing for {missing or 'every candidate'})"
        )
    checks = [
        Check(
            rule,
            r,
            float(np.mean([c[r] for c in curves[rule].values()])),
            float(np.mean([c[2 * r] for c in curves[rule].values()])),
            len(curves[rule]),
        )
        for r in candidates
        for rule in res.axis("rules")
        if rule in curves
    ]
    passed = [r for r in candidates if all(c.flat(tolerance) for c in checks if c.rounds == r)]
    return Budget(task, setting, metric, tolerance, checks, min(passed) if passed else None)


def _doubling(rounds: list[int]) -> list[int]:
    """The first evaluated round, doubled while its double is evaluated too."""
    out: list[int] = []
    r = min((x for x in rounds if x > 0), default=0)
    while r and 2 * r in rounds:
        out.append(r)
        r *= 2
    return out


def budget_markdown(b: Budget) -> str:
    """The checks as a markdown table and the verdict in words."""
    points = round(100 * b.tolerance, 6)
    lines = [
        f"Budget pilot, {b.task}, {b.setting}: seed-mean {b.metric} at R and 2R rounds; flat: within {points:g} points "
        f"({b.tolerance:g}).",
        "",
        "| rule | R | seeds | at R | at 2R | 2R - R | flat |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in b.checks:
        flat = "yes" if c.flat(b.tolerance) else "no"
        lines.append(f"| {c.rule} | {c.rounds} | {c.seeds} | {c.at_r:.4f} | {c.at_2r:.4f} | {c.gain:+.4f} | {flat} |")
    lines.append("")
    if b.rounds is not None:
        lines.append(f"Budget: **{b.rounds} rounds**, the smallest R at which every rule is flat.")
    else:
        largest = 2 * max(b.candidates)
        lines.append(
            f"No candidate R ({', '.join(map(str, b.candidates))}) is flat for every rule: the curves were still "
            f"moving at {max(b.candidates)} rounds. A budget of {largest} rounds was not shown to be flat."
        )
    return "\n".join(lines) + "\n"


def pilot_budgets(res: Results, tolerance: float = 0.01, candidates: list[int] | None = None) -> list[Budget]:
    """:func:`pilot_budget` of every (task, setting) the pilot sweep plans, in axis order."""
    cells = {(lab["task"], lab["setting"]) for r in res.runs for lab in r.labels}
    if not cells:
        raise ValueError("the sweep lists no run: give the --results folder of a budget pilot that has started")
    axes = res.index.get("axes", {})
    tasks, settings = list(axes.get("tasks", [])), list(axes.get("settings", []))

    def order(cell: tuple[str, str]) -> tuple:
        t, s = cell
        return (
            tasks.index(t) if t in tasks else len(tasks),
            t,
            settings.index(s) if s in settings else len(settings),
            s,
        )

    return [pilot_budget(res, t, s, tolerance, candidates) for t, s in sorted(cells, key=order)]
