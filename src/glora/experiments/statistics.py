"""The numbers of a report, from a sweep read back (``sweep_results.Results``): per cell, the
mean and sample standard deviation over seeds of the final metric, seed-by-seed differences
between two rules, costs per round and metric-against-round curves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glora.aggregation import RULES
from glora.experiments.sweep_results import Results, Run

MIB = 2.0**20


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof 1; None for one value) of n values."""

    n: int
    mean: float
    std: float | None

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """The t-interval of the mean at ``level`` (n - 1 degrees of freedom); None for n < 2.
        Of paired differences, the usual paired comparison: an interval holding 0 is a tie."""
        if self.std is None:
            return None
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, self.n - 1)) * self.std / self.n**0.5
        return self.mean - half, self.mean + half

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        arr = np.asarray(values, dtype=np.float64)
        return cls(len(arr), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None)


def personal(rule: str) -> bool:
    """Whether ``rule`` reports its clients' own models rather than one global model."""
    return rule in RULES and RULES[rule].reports_personal


def final_stat(
    res: Results, task: str, setting: str, rule: str, metric: str, rank: str | None = None, last: int | None = None
) -> Stat | None:
    """The final metric of a cell over seeds: the run's main result (``final``), the model a
    client of ``rank`` receives, or the global model's mean over the ``last`` evaluations."""
    values = list(final_values(res, task, setting, rule, metric, rank, last).values())
    return Stat.of(values) if values else None


def final_values(
    res: Results, task: str, setting: str, rule: str, metric: str, rank: str | None = None, last: int | None = None
) -> dict[int, float]:
    """The final metric of each seed of a cell that recorded it (see ``final_stat``). With
    ``last``, each seed's global-model metric averaged over its last ``last`` evaluated rounds
    (seeds with fewer evaluations left out): one round's value can swing by several points
    when few clients are sampled a round, and the mean of the last few is the usual steadier
    summary. Personalised rules have no global model a round, so they give no values then."""
    if last is not None:
        if personal(rule):
            return {}
        tails = {seed: list(run.evaluations(metric).values())[-last:] for seed, run in res.cell(task, setting, rule)}
        return {seed: float(np.mean(tail)) for seed, tail in tails.items() if len(tail) == last}
    values = {}
    for seed, run in res.cell(task, setting, rule):
        source = run.summary.get("final") if rank is None else (run.summary.get("final_by_rank") or {}).get(rank)
        if source is not None and metric in source:
            values[seed] = source[metric]
    return values


def last_rounds(res: Results, task: str, setting: str, metric: str, last: int) -> list[int]:
    """The rounds that the mean over the ``last`` evaluations of ``metric`` covers in (task,
    setting), over every finished run of it (runs of one setting share their evaluation rounds)."""
    rounds: set[int] = set()
    for run in res.runs_of(task, setting):
        rounds.update(list(run.evaluations(metric))[-last:])
    return sorted(rounds)


def paired_stat(
    res: Results,
    task: str,
    setting: str,
    rule: str,
    other: str,
    metric: str,
    last: int | None = None,
    other_setting: str | None = None,
) -> tuple[Stat, int] | None:
    """``rule``'s final metric (or mean over the ``last`` evaluations) minus ``other``'s, over
    the seeds both finished, and on how many of those seeds ``rule`` came out ahead. A seed
    fixes the partition, the sampled clients and the initial adapters for every rule, so the
    difference on one seed compares the rules on the same data: the spread of the difference
    is the rules', without the splits'. ``other_setting``: ``other``'s runs in that setting
    instead (a variant column against its partner, whose splits it shares)."""
    mine = final_values(res, task, setting, rule, metric, last=last)
    theirs = final_values(res, task, other_setting or setting, other, metric, last=last)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    diffs = [mine[s] - theirs[s] for s in seeds]
    return Stat.of(diffs), sum(d > 0 for d in diffs)


def cost_stats(res: Results, setting: str, rule: str) -> dict[str, Stat] | None:
    """Per-round costs of every run of (setting, rule), over tasks and seeds."""
    runs = {r.identity: r for task in res.axis("tasks") for _, r in res.cell(task, setting, rule)}
    return run_costs(list(runs.values())) if runs else None


def run_costs(runs: list[Run]) -> dict[str, Stat]:
    """Over ``runs``: each run's mean server seconds, MiB up and MiB down a round, and its wall
    seconds."""
    return {
        "server_seconds": Stat.of([float(np.mean([x["server_seconds"] for x in r.rounds])) for r in runs]),
        "mib_up": Stat.of([float(np.mean([x["bytes_up"] for x in r.rounds])) / MIB for r in runs]),
        "mib_down": Stat.of([float(np.mean([x["bytes_down"] for x in r.rounds])) / MIB for r in runs]),
        "wall_seconds": Stat.of([r.summary["wall_seconds"] for r in runs]),
    }


def curve(res: Results, task: str, setting: str, rule: str, metric: str) -> tuple[list[int], list[Stat]]:
    """The global model's metric against round, over seeds, at the rounds every seed evaluated."""
    per_seed = [run.evaluations(metric) for _, run in res.cell(task, setting, rule)]
    if not per_seed:
        return [], []
    rounds = sorted(set.intersection(*(set(s) for s in per_seed)))
    return rounds, [Stat.of([s[t] for s in per_seed]) for t in rounds]


def mixes_devices(res: Results, task: str, setting: str, rule: str) -> bool:
    """Whether the seeds of a cell trained on more than one kind of device: their spread then
    holds the devices' different numerics as well as the seeds'."""
    return len({run.device for _, run in res.cell(task, setting, rule)}) > 1


def ranks_of(res: Results, task: str, setting: str) -> list[str]:
    """Client ranks with a per-rank result in (task, setting), in increasing order."""
    ranks = {k for r in res.runs_of(task, setting) for k in (r.summary.get("final_by_rank") or {})}
    return sorted(ranks, key=int)


def compute_seconds(runs: list[Run]) -> float:
    return float(sum(r.summary["wall_seconds"] for r in runs))


def majority_score(res: Results, task: str, setting: str, metric: str) -> float | None:
    """``metric`` of always predicting the most frequent label of the evaluation split the
    cell's runs were scored on (the validation split or the held-out slice), by the same
    metric code as the runs; for a regression (STS-B), of always predicting the mean label
    (its correlations are 0 by that code). None where the data cannot be read here or the task
    is not a GLUE task. A rule whose curve sits on this line has learned nothing but the prior."""
    import numpy as np

    from glora.data import glue
    from glora.data.metrics import compute_metrics

    runs = res.runs_of(task, setting)
    if not runs or task not in glue.task_names():
        return None
    cfg = runs[0].config
    spec = glue.get_task(task)
    try:
        if cfg.get("eval_split", "validation") == "heldout":
            rows = glue.load_glue(task, "train", cfg.get("data_dir"))
            order = np.random.default_rng(0).permutation(len(rows))  # the slice ClassificationTask holds out
            rows = [rows[i] for i in sorted(order[: cfg.get("heldout_examples", 1000)].tolist())]
        else:
            rows = glue.load_glue(task, "validation", cfg.get("data_dir"))
    except (ValueError, OSError):
        return None
    labels = np.array([r["label"] for r in rows][: cfg.get("max_eval_examples") or None])
    constant = labels.mean() if spec.is_regression else np.bincount(labels).argmax()
    return compute_metrics(spec, np.full(len(labels), constant), labels).get(metric)


# How close to the majority class's score a cell's seed-mean may sit and still be said to
# predict (nearly) nothing but the prior: 1 point of accuracy, 0.01 of a correlation.
AT_MAJORITY = 0.01


def at_majority(res: Results, task: str, setting: str, metric: str) -> list[str] | None:
    """The rules of a cell whose seed-mean final ``metric`` is within :data:`AT_MAJORITY` of
    the majority class's score (:func:`majority_score`), in axis order; None where that score
    cannot be computed here."""
    majority = majority_score(res, task, setting, metric)
    if majority is None:
        return None
    out = []
    for rule in res.axis("rules"):
        stat = final_stat(res, task, setting, rule, metric)
        if stat is not None and abs(stat.mean - majority) <= AT_MAJORITY + 1e-9:
            out.append(rule)
    return out
