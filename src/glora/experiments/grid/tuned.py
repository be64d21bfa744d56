"""The learning rate that a tuning sweep chose, for ``glora sweep --lr-from``.

Rates are chosen on a held-out slice of the training data (``eval_split = "heldout"``, never
the validation split), in one of two ways:

- shared (the protocol of the first evidence sweeps): every rule of a task uses one rate,
  the one whose federated rules (every rule of the tuning grid except the centralized and
  local references) have the best mean final main metric, each rule's value first averaged
  over seeds. Only rates at which every federated rule of the task finished count, so a
  half-done tuning sweep cannot pick a rate because its weak rules have not run yet;
- per rule (``--lr-per-rule``, the protocol of results/sweeps/PROTOCOL.md): each (task, rule)
  uses the rate of its own best seed-mean, once every run of it (every rate, every seed) has
  finished (references included: each is tuned like a rule; a rule that declares
  ``tuned_as`` takes that rule's rate).

Ties go to the smaller rate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glora.experiments.sweep_results import FINISHED, REFERENCES, Results, load_results


def tuned_lrs(res: Results) -> dict[str, float]:
    """{task: chosen learning rate} from a tuning sweep's results (see the module docstring)."""
    scores: dict[str, dict[float, dict[str, list[float]]]] = {}
    for run in _heldout(res.finished()):
        cfg = run.config
        if cfg["rule"] in REFERENCES:
            continue
        value = (run.summary.get("final") or {}).get(run.summary["main_metric"])
        if value is None:
            continue
        scores.setdefault(cfg["task"], {}).setdefault(float(cfg["lr"]), {}).setdefault(cfg["rule"], []).append(value)
    out = {}
    for task, by_lr in scores.items():
        every_rule = {rule for rules in by_lr.values() for rule in rules}
        complete = {lr: rules for lr, rules in by_lr.items() if set(rules) == every_rule}
        means = {lr: float(np.mean([np.mean(v) for v in rules.values()])) for lr, rules in complete.items()}
        out[task] = min(means, key=lambda lr: (-means[lr], lr))
    if not out:
        raise ValueError("the tuning sweep has no finished federated run yet: run it first (glora sweep lr-tuning)")
    return out


def tuned_lrs_per_rule(res: Results) -> dict[tuple[str, str], float]:
    """{(task, rule): chosen learning rate} (see the module docstring, "per rule"). A (task,
    rule) is tuned only once every run the sweep plans for it has finished (every rate, every
    seed): a half-done rule would choose among the rates that happen to have run."""
    out = _choose(rule_scores(res), untuned_rules(res))
    if not out:
        raise ValueError("the tuning sweep has no rule with every run finished yet: run it first")
    return out


def _choose(scores: dict, untuned: dict) -> dict[tuple[str, str], float]:
    """Each tuned (task, rule)'s rate of the best seed-mean score, ties to the smaller rate."""
    out = {}
    for cell, by_lr in scores.items():
        if cell not in untuned:
            means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
            out[cell] = min(means, key=lambda lr: (-means[lr], lr))
    return out


def rule_scores(res: Results) -> dict[tuple[str, str], dict[float, list[float]]]:
    """{(task, rule): {rate: the final main metric of each finished seed}} of a tuning sweep."""
    scores: dict[tuple[str, str], dict[float, list[float]]] = {}
    for run in _heldout(res.finished()):
        cfg = run.config
        value = (run.summary.get("final") or {}).get(run.summary["main_metric"])
        if value is not None:
            scores.setdefault((cfg["task"], cfg["rule"]), {}).setdefault(float(cfg["lr"]), []).append(value)
    return scores


def rate_table(res: Results) -> str:
    """Markdown: each (task, rule)'s seed-mean held-out score at every rate (n seeds) and the
    rate ``--lr-per-rule`` takes, or how far a rule still tuning is. A rate at the edge of the
    grid is marked: the best rate may lie beyond it."""
    scores, untuned = rule_scores(res), untuned_rules(res)
    chosen = _choose(scores, untuned)
    rates = sorted({lr for by_lr in scores.values() for lr in by_lr})
    lines = [
        "| task | rule | " + " | ".join(f"{lr:g}" for lr in rates) + " | chosen |",
        "| --- | --- | " + " | ".join("---:" for _ in rates) + " | --- |",
    ]
    cells = sorted(set(scores) | set(untuned), key=lambda c: (c[0], _order(res, c[1])))
    for task, rule in cells:
        by_lr = scores.get((task, rule), {})
        shown = [f"{np.mean(by_lr[lr]):.4f} ({len(by_lr[lr])})" if lr in by_lr else "" for lr in rates]
        if (task, rule) in chosen:
            pick = f"**{chosen[task, rule]:g}**{_edge(chosen[task, rule], sorted(by_lr))}"
        else:
            pick = f"not yet: {untuned[task, rule]}"
        lines.append(f"| {task} | {rule} | " + " | ".join(shown) + f" | {pick} |")
    return "\n".join(lines) + "\n"


def _edge(lr: float, tried: list[float]) -> str:
    """Words for a chosen rate at the edge of the rates tried (the best may lie beyond)."""
    if len(tried) > 1 and lr == tried[-1]:
        return " (the largest rate tried)"
    if len(tried) > 1 and lr == tried[0]:
        return " (the smallest rate tried)"
    return ""


def _order(res: Results, rule: str) -> int:
    rules = list(res.index.get("axes", {}).get("rules", []))
    return rules.index(rule) if rule in rules else len(rules)


def untuned_rules(res: Results) -> dict[tuple[str, str], str]:
    """{(task, rule): how far its tuning is} for every (task, rule) of the sweep with a grid cell
    (a rate and a seed) that no finished run fills yet, and every rule of the sweep's axes with
    no run in its index yet (a sweep run with --only-rules has not planned the others). Cells,
    not runs, are counted: an index that still lists a run planned by an older version of the
    code for a cell that a newer run has filled does not hold the rule back."""
    planned: dict[tuple[str, str], set[tuple[str, int]]] = {}
    filled: dict[tuple[str, str], set[tuple[str, int]]] = {}
    for run in res.runs:
        for lab in run.labels:
            key, cell = (lab["task"], lab["rule"]), (lab["setting"], lab["seed"])
            planned.setdefault(key, set()).add(cell)
            if run.status == FINISHED:
                filled.setdefault(key, set()).add(cell)
    out = {
        key: f"{len(filled.get(key, ()))} of {len(cells)} runs finished"
        for key, cells in planned.items()
        if len(filled.get(key, ())) < len(cells)
    }
    axes = res.index.get("axes", {})
    for task in axes.get("tasks", []):
        for rule in axes.get("rules", []):
            if (task, rule) not in planned:
                out[task, rule] = "no run of it in the sweep yet"
    return out


def _heldout(runs: list) -> list:
    """The runs, after refusing any scored on another split than the held-out slice."""
    for run in runs:
        if run.config["eval_split"] != "heldout":
            raise ValueError(
                f"run {run.identity} of the tuning sweep was scored on the {run.config['eval_split']} split; tune "
                "on eval_split = 'heldout' (a slice of the training data), never on the validation split"
            )
    return runs


def tuned_lrs_from(results_dir: Path, per_rule: bool = False) -> dict:
    """:func:`tuned_lrs` (or :func:`tuned_lrs_per_rule`) of the sweep in ``results_dir``."""
    res = load_results(Path(results_dir))
    return tuned_lrs_per_rule(res) if per_rule else tuned_lrs(res)
