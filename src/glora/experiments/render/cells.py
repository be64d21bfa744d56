"""How the report's markdown writes a cell (mean ± std (n), bold for the best federated
rule, ‡ where devices mix), a rule's name and a table; shared by the report's sections."""

from __future__ import annotations

from glora.experiments.statistics import Stat, final_stat, mixes_devices, personal
from glora.experiments.sweep_results import REFERENCES, Results


def fmt(stat: Stat | None, best: bool = False, mixed: bool = False) -> str:
    if stat is None:
        return ""
    text = f"{stat.mean:.4f}" + (f" ± {stat.std:.4f}" if stat.std is not None else "")
    return (f"**{text}**" if best else text) + f" ({stat.n})" + (" ‡" if mixed else "")


def best_rules(stats: dict[str, Stat | None]) -> set[str]:
    """Rules with the highest mean among the federated rules (references excluded); none
    where fewer than two federated rules have a value (a column of one rule ranks nothing) or
    where every one has the same mean (CoLA's columns at MCC 0: no rule is ahead of another)."""
    means = {rule: s.mean for rule, s in stats.items() if s is not None and rule not in REFERENCES}
    top = max(means.values(), default=None)
    best = {rule for rule, m in means.items() if m == top}
    return set() if len(means) < 2 or best == set(means) else best


def rule_name(rule: str) -> str:
    mark = " †" if personal(rule) else ""
    return f"{rule} (reference){mark}" if rule in REFERENCES else f"{rule}{mark}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metric_rows(
    res: Results,
    task: str,
    settings: list[str],
    rules: list[str],
    metric: str,
    last: int | None = None,
    rank: bool = True,
) -> list[list[str]]:
    stats = {(s, r): final_stat(res, task, s, r, metric, last=last) for s in settings for r in rules}
    best = {s: best_rules({r: stats[s, r] for r in rules}) if rank else set() for s in settings}
    return [
        [rule_name(r), *(fmt(stats[s, r], r in best[s], mixes_devices(res, task, s, r)) for s in settings)]
        for r in rules
        if any(stats[s, r] is not None for s in settings)
    ]
