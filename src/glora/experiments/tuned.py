"""The learning rate per task that a tuning sweep chose, for ``glora sweep --lr-from``.

Fairness rule of the evidence sweeps: every rule shares one learning rate per task, chosen
on a held-out slice of the training data (``eval_split = "heldout"``, never the validation
split). The chosen rate is the one whose federated rules (every rule of the tuning grid
except the centralized and local references) have the best mean final main metric, each
rule's value first averaged over seeds; ties go to the smaller rate. Only rates at which
every federated rule of the task finished count, so a half-done tuning sweep cannot pick a
rate because its weak rules have not run yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glora.experiments.sweep_results import REFERENCES, Results, load_results


def tuned_lrs(res: Results) -> dict[str, float]:
    """{task: chosen learning rate} from a tuning sweep's results (see the module docstring)."""
    scores: dict[str, dict[float, dict[str, list[float]]]] = {}
    for run in res.finished():
        cfg = run.config
        if cfg["eval_split"] != "heldout":
            raise ValueError(
                f"run {run.identity} of the tuning sweep was scored on the {cfg['eval_split']} split; tune on "
                "eval_split = 'heldout' (a slice of the training data), never on the validation split"
            )
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


def tuned_lrs_from(results_dir: Path) -> dict[str, float]:
    """:func:`tuned_lrs` of the sweep in ``results_dir``."""
    return tuned_lrs(load_results(Path(results_dir)))
