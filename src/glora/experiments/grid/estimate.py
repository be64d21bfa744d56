"""What a run will cost in wall time, before it runs: a simple model fitted by eye to runs
on this machine (2 threads), for planning grids and for a sweep's time left before any
run has finished. It counts local steps, evaluations and a fixed setup cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glora.aggregation import RULES
from glora.federation.config import RunConfig
from glora.federation.engine import client_steps

_COST_KEYS = (
    "step_seconds",
    "eval_example_seconds",
    "eval_examples",
    "train_examples",
    "setup_seconds",
    "round_seconds",
)


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work. Each field is one number for every task, or a table
    ``{task: number, "default": number}``, as in a preset's ``[cost]`` section.

    step_seconds: one local optimiser step (SST-2/CoLA, batch 32, max length 64, MiniLM:
        about 0.4 s; sentence pairs cost about 4x more, MPNet about 4x more than MiniLM).
    eval_example_seconds: one evaluation example through one model (no gradients).
    eval_examples: size of the evaluation split when the run does not cap it.
    train_examples: pooled training examples, only to convert ``local_epochs`` to steps.
    setup_seconds: loading the backbone and data, exporting the adapter.
    round_seconds: the server's share of a round (aggregation, checkpoint).
    """

    step_seconds: float | dict[str, float] = 0.4
    eval_example_seconds: float | dict[str, float] = 0.004
    eval_examples: float | dict[str, float] = 1000
    train_examples: float | dict[str, float] = 10_000
    setup_seconds: float | dict[str, float] = 20.0
    round_seconds: float | dict[str, float] = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "preset") -> CostModel:
        unknown = sorted(set(d) - set(_COST_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown [cost] keys {unknown}; allowed: {list(_COST_KEYS)}")
        return cls(**{k: dict(v) if isinstance(v, dict) else float(v) for k, v in d.items()})

    def get(self, name: str, task: str) -> float:
        """The value of field ``name`` for ``task`` (its own entry, else "default", else the class default)."""
        value = getattr(self, name)
        if isinstance(value, dict):
            default = getattr(CostModel, name)
            return float(value.get(task, value.get("default", default)))
        return float(value)


def estimate_seconds(cfg: RunConfig, cost: CostModel) -> float:
    """Estimated wall seconds of one run of ``cfg``."""
    rule = RULES[cfg.rule]
    task = cfg.task
    per_round = max(1, round(cfg.fraction * cfg.clients))
    # The loop's own step count (federation.engine.client_steps): the pooled reference is one
    # client holding every example, the others a client of the mean share each. The pooled
    # data's size only matters under local epochs.
    n_train = (cfg.max_train_examples or cost.get("train_examples", task)) if cfg.local_epochs is not None else 0
    if rule.pooled:
        steps = client_steps(cfg, rule, n_train)
    else:
        steps = per_round * client_steps(cfg, rule, n_train / cfg.clients)
    train = cfg.rounds * (steps * cost.get("step_seconds", task) + cost.get("round_seconds", task))
    n_eval = cost.get("eval_examples", task) if cfg.eval_split == "validation" else cfg.heldout_examples
    if cfg.max_eval_examples is not None:
        n_eval = min(n_eval, cfg.max_eval_examples)
    ranks = {max(cfg.client_ranks())} if rule.pooled else set(cfg.client_ranks())
    models = 1 + (len(ranks) if cfg.eval_ranks and len(ranks) > 1 else 0)
    evals = sum(1 for t in range(1, cfg.rounds + 1) if t % cfg.eval_every == 0 or t == cfg.rounds)
    eval_models = evals * models
    if rule.reports_personal:
        eval_models += min(cfg.clients, per_round * cfg.rounds)  # each client's own model, at the end
    evaluation = eval_models * n_eval * cost.get("eval_example_seconds", task)
    return cost.get("setup_seconds", task) + train + evaluation
