"""A run config checked before any data or model is loaded: every value in range, the rule,
the task family, the device and precision, and their combinations."""

from __future__ import annotations

import math

from glora.aggregation import Rule, get_rule
from glora.aggregation.base import FACTORS
from glora.data.partition import dirichlet_scheme
from glora.federation.config import RunConfig
from glora.models.backbones import POOLINGS
from glora.models.device import resolve_device
from glora.models.precision import check_precision
from glora.tasks import task_class
from glora.tracking import parse_report_to


def check_config(cfg: RunConfig) -> Rule:
    """Everything that can be checked before loading data or models; returns the rule."""
    rule = get_rule(cfg.rule, **cfg.rule_options)
    resolve_device(cfg.device)
    if cfg.alpha is not None and not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise ValueError(f"--alpha must be > 0 (Dirichlet concentration), got {cfg.alpha}; use --alpha iid for IID")
    if cfg.rounds < 0:
        raise ValueError(f"--rounds must be >= 0 (0: evaluate the untuned backbone only), got {cfg.rounds}")
    family = task_class(cfg.task)
    family.check_config(cfg)
    for name, value in (
        ("clients", cfg.clients),
        ("local-steps", cfg.local_steps),
        ("batch-size", cfg.batch_size),
        ("eval-every", cfg.eval_every),
    ):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not 0 < cfg.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    for name, value in (("lr", cfg.lr), ("head-lr", cfg.head_lr), ("head-lr-ratio", cfg.head_lr_ratio)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")
    for name, value in (
        ("max-train-examples", cfg.max_train_examples),
        ("max-eval-examples", cfg.max_eval_examples),
        ("threads", cfg.threads),
        ("min-client-examples", cfg.min_client_examples),
    ):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if cfg.logit_adjustment < 0:
        raise ValueError(f"--logit-adjustment must be >= 0 (0: plain cross-entropy), got {cfg.logit_adjustment}")
    if cfg.logit_adjustment > 0 and not family.has_labels(cfg):
        raise ValueError(
            f"--logit-adjustment needs a classification task (it shifts the logits by the client's label "
            f"prior); task {cfg.task!r} has no labels to count: leave it at 0"
        )
    if cfg.pooling not in POOLINGS:
        raise ValueError(f"--pooling must be {' or '.join(repr(p) for p in POOLINGS)}, got {cfg.pooling!r}")
    if cfg.pooling != "cls" and not family.has_head:
        raise ValueError(
            f"--pooling applies to classification heads; task {cfg.task!r} generates text: leave it at cls"
        )
    parse_report_to(cfg.report_to)
    check_precision(cfg.dtype, cfg.load_in_4bit, cfg.load_in_8bit, cfg.device)
    if cfg.grad_accum_steps < 1:
        raise ValueError(f"--grad-accum-steps must be >= 1, got {cfg.grad_accum_steps}")
    if cfg.max_grad_norm is not None and not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0):
        raise ValueError(
            f"--max-grad-norm must be a finite number > 0 (or unset: no clipping), got {cfg.max_grad_norm}"
        )
    if cfg.dtype != "float32" and family.has_head and cfg.pooling != "mean":
        raise ValueError(f"--dtype {cfg.dtype} needs --pooling mean for a classifier (its head stays float32)")
    if not 0 <= cfg.personal_holdout < 1:
        raise ValueError(f"--personal-holdout must be in [0, 1), got {cfg.personal_holdout}")
    if cfg.personal_holdout > 0 and not hasattr(family, "evaluate_examples"):
        raise ValueError(f"--personal-holdout needs a task that scores training examples; {cfg.task!r} does not")
    if cfg.eval_clients is not None and cfg.eval_clients < 1:
        raise ValueError(
            f"--eval-clients must be >= 1 (the clients whose own models an evaluation scores; leave it unset to "
            f"score every client's at the last round only), got {cfg.eval_clients}"
        )
    if cfg.eval_clients is not None and not rule.reports_personal:
        raise ValueError(
            f"--eval-clients samples the clients' own models, and rule {cfg.rule!r} keeps none (its clients hold "
            "the global model): leave it unset"
        )
    dirichlet_scheme(cfg.partition_scheme)
    if cfg.on_client_error not in ("skip", "abort"):
        raise ValueError(f"--on-client-error must be 'skip' or 'abort', got {cfg.on_client_error!r}")
    if not 0 <= cfg.max_failed_fraction <= 1:
        raise ValueError(f"--max-failed-fraction must be in [0, 1], got {cfg.max_failed_fraction}")
    if cfg.clip_update_norm is not None and not (math.isfinite(cfg.clip_update_norm) and cfg.clip_update_norm >= 1):
        raise ValueError(
            f"--clip-update-norm must be a finite number >= 1 (a multiple of the median client norm, e.g. 2; "
            f"below 1 it would clip half the honest clients every round), got {cfg.clip_update_norm}"
        )
    if cfg.partition_scheme != "resample" and (cfg.alpha is None or cfg.partition_column):
        raise ValueError(
            f"--partition-scheme {cfg.partition_scheme} draws a Dirichlet split; with "
            f"{'--alpha iid' if cfg.alpha is None else '--partition-column'} there is none: leave it at resample"
        )
    if cfg.data_source not in ("local", "hub"):
        raise ValueError(f"--data-source must be 'local' or 'hub', got {cfg.data_source!r}")
    if cfg.data_source == "hub" and not family.reads_hub:
        raise ValueError(
            f"--data-source hub applies to GLUE tasks; task {cfg.task!r} reads its data from --data-dir "
            "(SuperNI) or --dataset (a hub id there loads it online)"
        )
    if cfg.weighting not in ("examples", "uniform"):
        raise ValueError(f"--weighting must be 'examples' or 'uniform', got {cfg.weighting!r}")
    if cfg.random_gauge and any(rule.client_plan(t).train != FACTORS for t in (1, 2)):
        raise ValueError(
            f"--random-gauge re-gauges both factors, but rule {cfg.rule!r} keeps one factor frozen and shared "
            "across clients; run the gauge control with rules that train B and A (e.g. glora, fedit, flora, "
            "flexlora, hetlora)"
        )
    ranks = cfg.client_ranks()
    if not rule.accepts_unequal_ranks and not rule.pooled and len(set(ranks)) > 1:
        raise ValueError(
            f"rule {cfg.rule!r} needs equal client ranks but --ranks {cfg.ranks!r} gives {sorted(set(ranks))}; "
            "use one rank (e.g. --ranks 8) or a rule that accepts different ranks (glora, flora, flexlora, "
            "hetlora, florist)"
        )
    return rule
