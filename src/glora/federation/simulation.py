"""The server round loop, simulated in one process.

Each round: sample clients, read out each one's adapter at its rank (the rule's state),
train locally, aggregate per layer with the rule, average the head, evaluate, merge what
the state says into the base weights, checkpoint. What a rule needs from the clients
comes from the rule (:class:`~glora.aggregation.base.ClientPlan`) and its state; this loop
never branches on a rule's name.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from glora.aggregation import ClientPlan, LayerState, Rule, average_params, get_rule
from glora.aggregation.base import FACTORS, leading, within_rank
from glora.federation.client import local_train
from glora.federation.config import NOT_IDENTITY, RunConfig
from glora.federation.results import ADAPTER, METRICS, RunStore
from glora.lowrank import LowRank, lora_init_A, random_gauge_matrix
from glora.models.backbones import POOLINGS
from glora.models.device import device_kind, resolve_device
from glora.models.lora import AdaptedModel, adapter_name, export_adapter
from glora.models.precision import check_precision
from glora.tasks import FederatedTask, build_task, task_class
from glora.tracking import Tracker, flatten, open_trackers, parse_report_to


@dataclass
class ServerState:
    """Everything the loop carries from one round to the next (and checkpoints)."""

    round: int = 0
    layers: dict[str, LayerState] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    base_offsets: dict[str, torch.Tensor] | None = None
    personal: dict[int, dict[str, Any]] = field(default_factory=dict)
    elapsed: float = 0.0


def adapted_model(task: FederatedTask, cfg: RunConfig, ranks: list[int]) -> AdaptedModel:
    """The task's backbone on the run's device, with a LoRA adapter for each of ``ranks``
    (and activation checkpointing with ``--gradient-checkpointing``). A quantized base is
    placed by its loader and not moved."""
    model = task.model
    device = resolve_device(cfg.device)
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        model = model.to(device)
    elif isinstance(getattr(model, "classifier", None), torch.nn.Module):
        model.classifier.to(device)  # a head glora added is not the loader's to place
    if cfg.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no gradient for the adapters to get one.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return AdaptedModel(model, task.lora, ranks)


def check_config(cfg: RunConfig) -> Rule:
    """Everything that can be checked before loading data or models; returns the rule."""
    rule = get_rule(cfg.rule, **cfg.rule_options)
    resolve_device(cfg.device)
    if cfg.alpha is not None and not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise ValueError(f"--alpha must be > 0 (Dirichlet concentration), got {cfg.alpha}; use --iid for IID")
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
    if cfg.head_lr_ratio <= 0:
        raise ValueError(f"--head-lr-ratio must be > 0 (the head's lr over the factors'), got {cfg.head_lr_ratio}")
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


def initial_adapters(model: AdaptedModel, ranks: list[int], seed: int) -> dict[int, dict[str, LowRank]]:
    """Round-1 adapters: B = 0 and a seeded LoRA A, the same for every client of a rank and
    nested across ranks (FFA-LoRA's shared frozen A, and a common start for every rule)."""
    shapes = model.layer_shapes()
    out: dict[int, dict[str, LowRank]] = {}
    for r in sorted(set(ranks)):
        scale = model.settings.scale(r)
        out[r] = {}
        for i, (name, (d_out, d_in)) in enumerate(sorted(shapes.items())):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            out[r][name] = LowRank(torch.zeros(d_out, r), lora_init_A(r, d_in, g), scale)
    return out


def holdout_split(parts: list[np.ndarray], share: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's examples split, with the seed, into those it trains on and a held-out
    ``share`` (at least one example where share > 0 and the client has two); sorted indices."""
    if share == 0:  # the parts as they are (their order too: it seeds the batches)
        return list(parts), [part[:0] for part in parts]
    train, held = [], []
    for i, part in enumerate(parts):
        k = min(len(part) - 1, max(1, round(share * len(part))))
        order = np.random.default_rng([seed, i, 31]).permutation(part)
        held.append(np.sort(order[:k]))
        train.append(np.sort(order[k:]))
    return train, held


def client_layout(
    cfg: RunConfig, task: FederatedTask, rule: Rule, split: tuple[list[np.ndarray], list[np.ndarray]] | None = None
) -> tuple[list[np.ndarray], list[int]]:
    """Each client's training examples (less its held-out share, ``--personal-holdout``) and
    rank. A pooled rule (the centralized reference) gets one client with everyone's training
    examples at the largest rank. ``split``: the task's :func:`holdout_split`, where the caller
    has it already (the partition is drawn once)."""
    parts = (split or holdout_split(task.partition(), cfg.personal_holdout, cfg.seed))[0]
    ranks = cfg.client_ranks()
    if rule.pooled:
        return [np.sort(np.concatenate(parts))], [max(ranks)]
    return parts, ranks


def sample_clients(n_clients: int, server_round: int, fraction: float, seed: int) -> list[int]:
    """The clients of a round: all of them, or a seeded ``fraction`` (sorted client indices)."""
    k = max(1, round(fraction * n_clients))
    if k >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng([seed, server_round, 17])
    return sorted(int(i) for i in rng.choice(n_clients, size=k, replace=False))


def client_steps(cfg: RunConfig, rule: Rule, n_examples: int) -> int:
    """Local optimiser steps of a client holding ``n_examples``. The pooled client takes the
    steps of every client sampled in a round, so the step budget equals the federation's."""
    if cfg.local_epochs is not None:
        return max(1, int(np.ceil(cfg.local_epochs * n_examples / cfg.batch_size)))
    per_round = max(1, round(cfg.fraction * cfg.clients)) if rule.pooled else 1
    return cfg.local_steps * per_round


def readout(st: ServerState, init: Mapping[int, Mapping[str, LowRank]], rank: int, scale: float) -> dict[str, LowRank]:
    """The adapter a client of this rank starts the round from: the state's readout, or the
    initial adapter before the first aggregation."""
    if st.layers:
        return {n: s.readout(rank, scale) for n, s in st.layers.items()}
    return dict(init[rank])


@dataclass
class ClientUpdate:
    """A client's answer to one round.

    factors: what the server aggregates, per layer (re-gauged under ``random_gauge``);
    head: the trained head; loss: mean training loss over the steps;
    own: what the client keeps for its next round (rules with personal factors or an
    unshared head), else None.
    """

    factors: dict[str, LowRank]
    head: dict[str, torch.Tensor]
    loss: float
    own: dict[str, Any] | None = None


def train_client(
    model: AdaptedModel,
    task: FederatedTask,
    cfg: RunConfig,
    rule: Rule,
    server_round: int,
    client: int,
    indices: np.ndarray,
    factors: Mapping[str, LowRank],
    head: Mapping[str, torch.Tensor],
    own: Mapping[str, Any] | None = None,
    on_step: Callable[[], None] | None = None,
) -> ClientUpdate:
    """One client's round, wherever it runs (this process or a Flower ClientApp): start from
    the server's readout ``factors`` and ``head`` (or the client's ``own`` where the rule keeps
    them personal), train locally with the run's seed formula and the rule's penalty, keep the
    rank the rule lets it keep, and return the update.

    A client that dropped trailing components in an earlier round (:meth:`Rule.pruned_rank`)
    holds its own factors at that smaller rank k: it uses the readout's leading k components
    (the rest of its rank-r adapter stays zero) and uploads at most k."""
    plan = rule.client_plan(server_round)
    r = next(iter(factors.values())).rank
    k = next(iter(own["factors"].values())).rank if own is not None else r
    if own is not None:
        factors = {n: _keep_personal(f, own["factors"][n], plan.personal) for n, f in factors.items()}
        if not plan.share_head:
            head = own["head"]
    start = {n: within_rank(f, k) for n, f in factors.items()}
    model.set_factors(r, start)
    model.set_head(r, head)
    params = model.activate(r, plan.train)
    adapter = adapter_name(r)

    def penalty() -> torch.Tensor | None:
        live = [(m.lora_B[adapter].weight[:, :k], m.lora_A[adapter].weight[:k]) for m in model.layers.values()]
        return rule.local_penalty(live)

    loss = local_train(
        model.peft,
        params,
        model.head_parameters(r),
        task.batch,
        indices,
        client_steps(cfg, rule, len(indices)),
        cfg.batch_size,
        cfg.lr,
        cfg.effective_head_lr(),
        cfg.weight_decay,
        seed=cfg.seed * 1_000_003 + server_round * 1009 + client,
        on_step=on_step,
        logit_bias=cfg.logit_adjustment * task.log_label_prior(indices) if cfg.logit_adjustment else None,
        penalty=penalty,
        grad_accum_steps=cfg.grad_accum_steps,
        max_grad_norm=cfg.max_grad_norm,
    )
    trained = {n: leading(f, k) for n, f in model.get_factors(r).items()}
    kept_rank = rule.pruned_rank({n: leading(f, k) for n, f in start.items()}, trained)
    trained = {n: leading(f, kept_rank) for n, f in trained.items()}
    new_head = model.get_head(r)
    keep = plan.personal or not plan.share_head or kept_rank < r
    kept = {"factors": trained, "head": new_head, "rank": r} if keep else None
    if cfg.random_gauge:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + server_round * 31 + client)
        G = random_gauge_matrix(kept_rank, g).float()
        trained = {n: f.gauge(G) for n, f in trained.items()}
    return ClientUpdate(trained, new_head, float(np.mean(loss)), kept)


def download_bytes(
    factors: Mapping[str, LowRank], merges: Mapping[str, Any], head: Mapping[str, torch.Tensor], plan: ClientPlan
) -> int:
    """What the server sends a client: the shared factors, the merges, the head if shared."""
    out = sum(_nbytes(f, FACTORS - plan.personal) for f in factors.values())
    out += sum(_nbytes(m) for m in merges.values())
    return out + (_head_bytes(head) if plan.share_head else 0)


def upload_bytes(update: ClientUpdate, plan: ClientPlan) -> int:
    """What a client sends the server under the rule's plan."""
    out = sum(_nbytes(f, plan.send) for f in update.factors.values())
    return out + (_head_bytes(update.head) if plan.share_head else 0)


def aggregate_round(
    rule: Rule,
    st: ServerState,
    server_round: int,
    clients: list[int],
    updates: list[ClientUpdate],
    weights: list[float],
    bytes_down: int,
) -> dict[str, Any]:
    """The server half of a round: keep each client's own part, aggregate every layer with
    the rule, average the head where the rule shares it; returns the round's metrics row."""
    plan = rule.client_plan(server_round)
    by_layer: dict[str, list[LowRank]] = {}
    for i, u in zip(clients, updates, strict=True):
        if u.own is not None:
            st.personal[i] = u.own
        for n, f in u.factors.items():
            by_layer.setdefault(n, []).append(f)
    t0 = time.perf_counter()
    st.layers = rule.aggregate_layers(by_layer, weights, previous=st.layers)
    if plan.share_head:
        st.head = average_params([u.head for u in updates], weights)
    server_seconds = time.perf_counter() - t0
    bytes_up = sum(upload_bytes(u, plan) for u in updates)
    return {
        "round": server_round,
        "clients": clients,
        "train_loss": float(np.average([u.loss for u in updates], weights=weights)),
        "server_seconds": server_seconds,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_up_per_client": bytes_up / len(clients),
        "bytes_down_per_client": bytes_down / len(clients),
    }


def update_record(
    st: ServerState, server_round: int, clients: list[int], updates: list[ClientUpdate], weights: list[float]
) -> dict[str, Any]:
    """What ``--record-updates`` stores of a round, in plain tensors (loadable with
    ``weights_only``): the sampled clients, their weights, each layer's factors (B, A, scale
    per client), heads and losses, and what had been merged into the base weights before the
    round (None: nothing), so a replay can rebuild the model the clients trained on."""
    return {
        "round": server_round,
        "clients": clients,
        "weights": weights,
        "factors": {
            n: [(u.factors[n].B, u.factors[n].A, u.factors[n].scale) for u in updates] for n in updates[0].factors
        },
        "heads": [u.head for u in updates],
        "losses": [u.loss for u in updates],
        "base_offsets": st.base_offsets,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nbytes(x: LowRank | torch.Tensor | None, factors: frozenset[str] = frozenset({"A", "B"})) -> int:
    if x is None:
        return 0
    if isinstance(x, LowRank):
        return sum(t.numel() * t.element_size() for f, t in (("B", x.B), ("A", x.A)) if f in factors)
    return x.numel() * x.element_size()


def _head_bytes(head: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in head.values())


def _merged_deltas(st: ServerState) -> dict[str, torch.Tensor | None]:
    """Each layer's dense base merge of this round (None where the rule merges nothing),
    computed once for all the models an evaluation builds on it."""
    return {n: s.merged_delta() for n, s in st.layers.items()}


def _plus(delta: torch.Tensor, merged: torch.Tensor | None) -> torch.Tensor:
    return delta if merged is None else delta + merged


class Federation:
    """One federated run: ``Federation(cfg, out_dir).run()``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.rule = check_config(cfg)
        self.store = RunStore(Path(out_dir))
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.trackers: list[Tracker] = []
        self._bar: Progress | None = None  # the run's progress display while rounds run

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        loading = self.console.status(f"loading {cfg.task} and {cfg.backbone}...") if self.progress else nullcontext()
        with loading:
            self.task = build_task(cfg)
        split = holdout_split(self.task.partition(), cfg.personal_holdout, cfg.seed)
        self.parts, self.ranks = client_layout(cfg, self.task, self.rule, split)
        self.held = split[1]  # the clients' held-out shares (--personal-holdout), as they hold them
        self.model = adapted_model(self.task, cfg, self.ranks)
        self.init = initial_adapters(self.model, self.ranks, cfg.seed)
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.float64)

    # -- one round --------------------------------------------------------------------------------
    def _round(self, st: ServerState, t: int, bar) -> dict[str, Any]:
        clients, updates, weights, bytes_down = self.client_updates(st, t, bar)
        if self.cfg.record_updates:
            self.store.save_updates(t, update_record(st, t, clients, updates, weights))
        return aggregate_round(self.rule, st, t, clients, updates, weights, bytes_down)

    def client_updates(
        self, st: ServerState, t: int, bar=None
    ) -> tuple[list[int], list[ClientUpdate], list[float], int]:
        """The client half of round ``t`` from state ``st``: the sampled clients, their
        updates, their aggregation weights and the bytes the server sent them."""
        cfg, plan = self.cfg, self.rule.client_plan(t)
        clients = sample_clients(len(self.parts), t, cfg.fraction, cfg.seed)
        merges = {n: s.merge() for n, s in st.layers.items()} if st.layers else {}
        updates, weights = [], []
        bytes_down = 0
        for i in clients:
            r = self.ranks[i]
            factors = readout(st, self.init, r, self.model.settings.scale(r))
            bytes_down += download_bytes(factors, merges, st.head, plan)
            task_id = None
            if bar is not None:
                total = client_steps(cfg, self.rule, len(self.parts[i]))
                task_id = bar.add_task(f"  client {i} (rank {r})", total=total)
            updates.append(
                train_client(
                    self.model,
                    self.task,
                    cfg,
                    self.rule,
                    t,
                    i,
                    self.parts[i],
                    factors,
                    st.head,
                    own=st.personal.get(i),
                    on_step=(lambda tid=task_id: bar.advance(tid)) if bar is not None else None,
                )
            )
            if bar is not None:
                bar.remove_task(task_id)
            weights.append(float(self.sizes[i]) if cfg.weighting == "examples" else 1.0)
        return clients, updates, weights, bytes_down

    # -- evaluation -------------------------------------------------------------------------------
    def _evaluate(self, st: ServerState) -> dict[str, Any]:
        """The global model (base + the state's full delta()) and the model a client of each
        rank receives (base + merge + its readout): for unequal ranks always, for equal ranks
        where it differs from the global model (a state larger than the clients' rank, as
        FlexLoRA's mean of rank up to the sum of theirs), so that no rule is scored only on a
        model no client holds."""
        out: dict[str, Any] = {}
        ranks = sorted(set(self.ranks)) if self.cfg.eval_ranks else []
        # A line in the run's progress display: evaluations (generation above all) take minutes.
        bar = self._bar
        task_id = bar.add_task("  evaluating: global model", total=1 + len(ranks)) if bar is not None else None
        with self.global_model(st) as m:
            out["eval"] = self.task.evaluate(m)
        by_rank = {}
        total = {n: s.delta() for n, s in st.layers.items()} if len(ranks) == 1 else None
        for r, deltas in self.received_deltas(st) if ranks else ():
            if bar is not None:
                bar.update(task_id, advance=1, description=f"  evaluating: a rank-{r} client's model")
            if total is not None and all(torch.allclose(deltas[n], total[n], rtol=1e-5, atol=1e-9) for n in total):
                continue  # the clients' one rank receives the global model itself
            with self.model.dense_update(deltas, self.ranks[0], st.head) as m:
                by_rank[str(r)] = self.task.evaluate(m)
        if bar is not None:
            bar.remove_task(task_id)
        if by_rank:
            out["eval_by_rank"] = by_rank
        return out

    def global_model(self, st: ServerState) -> AbstractContextManager[torch.nn.Module]:
        """The global model (base + the state's full delta() + the shared head) for the
        duration of a ``with`` block."""
        return self.model.dense_update({n: s.delta() for n, s in st.layers.items()}, self.ranks[0], st.head)

    def received_deltas(self, st: ServerState) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(rank, dense update per layer) of what a client of each rank receives: what was
        merged into the base plus the state's readout at its rank; one rank at a time."""
        merged = _merged_deltas(st)
        for r in sorted(set(self.ranks)):
            scale = self.model.settings.scale(r)
            yield r, {n: _plus(s.readout(r, scale).delta(), merged[n]) for n, s in st.layers.items()}

    def _evaluate_held_out(self, st: ServerState) -> dict[str, Any]:
        """On each client's held-out share of its own data, the mean over clients of: the
        global model's score ("eval_heldout_global") and, for personalised rules, the client's
        own model's ("eval_heldout_personal")."""
        clients = [i for i, h in enumerate(self.held) if len(h)]
        if not clients:
            return {}  # no client holds two examples: nothing was held out
        with self.global_model(st) as m:
            scores = [self.task.evaluate_examples(m, self.held[i]) for i in clients]
        out = {"eval_heldout_global": _mean_scores(scores)}
        if self.rule.reports_personal:
            merged = _merged_deltas(st)
            own_scores = []
            for i in (i for i in clients if i in st.personal):  # a client never sampled has no model
                with self.own_model(st.personal[i], merged) as m:
                    own_scores.append(self.task.evaluate_examples(m, self.held[i]))
            if own_scores:
                out["eval_heldout_personal"] = _mean_scores(own_scores)
        return out

    def _evaluate_personal(self, st: ServerState) -> dict[str, float]:
        """Mean over clients of each client's own model (its last trained factors and head)."""
        per_client = []
        merged = _merged_deltas(st)
        for _, own in sorted(st.personal.items()):
            with self.own_model(own, merged) as m:
                per_client.append(self.task.evaluate(m))
        return _mean_scores(per_client)

    def own_model(
        self, own: Mapping[str, Any], merged: Mapping[str, torch.Tensor | None]
    ) -> AbstractContextManager[torch.nn.Module]:
        """A client's own model (base + what was merged + its last trained factors, its head)
        for the duration of a ``with`` block; ``merged``: :func:`_merged_deltas` of the state."""
        deltas = {n: _plus(f.delta(), merged[n]) for n, f in own["factors"].items()}
        return self.model.dense_update(deltas, own["rank"], own["head"])

    # -- the run ----------------------------------------------------------------------------------
    def begin(self, resume: bool = False, command: list[str] | None = None) -> ServerState:
        """Check the run folder, load the task and model, and return the state to start from
        (a fresh one, or the last checkpoint's with ``resume``). ``command`` goes to meta.json
        (default: this process's argv)."""
        cfg, store = self.cfg, self.store
        existing = store.config()
        if existing is not None and not resume:
            raise ValueError(
                f"{store.folder} already holds a run; pass --resume to continue it or choose another --out"
            )
        if existing is not None and existing.get("identity") != cfg.identity():
            saved = RunConfig.from_saved(existing).to_dict()
            changed = [
                f"{k.replace('_', '-')} {saved[k]!r} -> {v!r}"
                for k, v in cfg.to_dict().items()
                if saved.get(k) != v and k not in NOT_IDENTITY
            ]
            raise ValueError(
                f"{store.folder} holds a run with another config (identity {existing.get('identity')}, this one "
                f"{cfg.identity()}; changed: {', '.join(changed) or 'nothing visible'}); resume it with the same "
                "options or choose another --out"
            )
        self._setup()
        st = ServerState(head=self.model.get_head(self.ranks[0]))
        ckpt = store.load_checkpoint() if resume else None
        if store.torn_metrics_line():
            self.console.print(
                f"[yellow]dropping the torn last line of {store.path(METRICS)} (a crash while writing it); "
                "its round runs again[/yellow]"
            )
        if ckpt is not None:
            st = ckpt["state"]
            if st.base_offsets is not None:
                self.model.set_base_offsets(st.base_offsets)
            store.truncate_metrics(st.round)
            store.truncate_updates(st.round)
            store.note_resume(st.round, command=command, device=device_kind(cfg.device))
            self.console.print(f"[bold]resuming[/bold] {store.folder} after round {st.round}")
        else:
            # A new run, or one begun again from round 1 (no checkpoint): meta.json says where
            # and from which code this start was made, not an earlier start's machine.
            store.start(cfg.to_dict(), cfg.identity(), command=command, device=device_kind(cfg.device))
            store.truncate_metrics(0)
            store.truncate_updates(0)
        self.started = time.perf_counter() - st.elapsed
        return st

    def end_round(self, st: ServerState, t: int, record: dict[str, Any], t_round: float) -> None:
        """After round ``t``'s aggregation: evaluate (every eval_every rounds and at the end),
        export the final adapter, merge what the state says into the base weights, and store
        the metrics row and a checkpoint. ``t_round``: the round's start (perf_counter)."""
        cfg = self.cfg
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            record.update(self._evaluate(st))
            if self.rule.reports_personal and t == cfg.rounds:
                record["eval_personal"] = self._evaluate_personal(st)
            if cfg.personal_holdout > 0 and t == cfg.rounds:
                record.update(self._evaluate_held_out(st))
        if t == cfg.rounds:
            self.export(st)
        merges = {n: m for n, s in st.layers.items() if (m := s.merge()) is not None}
        if merges:
            self.model.add_to_base(merges)
            st.base_offsets = self.model.base_offsets()
        record["round_seconds"] = time.perf_counter() - t_round
        record["peak_rss_mb"] = peak_rss_mb()
        st.round = t
        st.elapsed = time.perf_counter() - self.started
        self.store.append_metrics(record)
        for tracker in self.trackers:
            tracker.log(t, flatten(record))
        self.store.save_checkpoint({"state": st, "config": cfg.to_dict()})

    def evaluate_untuned(self, st: ServerState) -> None:
        """``--rounds 0``: the zero-shot reference. Evaluates the backbone as loaded (no
        adapter) and stores it as round 0, with an all-zero adapter as the export, so the run
        folder has the files of any other run."""
        t0 = time.perf_counter()
        record: dict[str, Any] = {
            "round": 0,
            "clients": [],
            "train_loss": None,
            "server_seconds": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "bytes_up_per_client": 0.0,
            "bytes_down_per_client": 0.0,
        }
        with self.model.dense_update({}, self.ranks[0], st.head) as m:
            record["eval"] = self.task.evaluate(m)
        self.export(st)
        record["round_seconds"] = time.perf_counter() - t0
        record["peak_rss_mb"] = peak_rss_mb()
        st.elapsed = time.perf_counter() - self.started
        self.store.append_metrics(record)
        for tracker in self.trackers:
            tracker.log(0, flatten(record))
        self.store.save_checkpoint({"state": st, "config": self.cfg.to_dict()})

    def finish(self, st: ServerState) -> dict[str, Any]:
        """Write and return the run's summary."""
        summary = self._summary(st)
        self.store.finish(summary)
        return summary

    def run(self, resume: bool = False) -> dict[str, Any]:
        with self.store.lock():
            try:
                return self._run(resume)
            finally:
                for tracker in self.trackers:
                    tracker.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        st = self.begin(resume)
        self.trackers = open_trackers(parse_report_to(cfg.report_to), self.store.folder, cfg.to_dict())
        prog = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            if self.progress
            else nullcontext()
        )
        if cfg.rounds == 0 and not self.store.metrics():
            self.evaluate_untuned(st)
            self.console.print(eval_line(0, self.store.metrics()[-1], self.task.main_metric))
        with prog as bar:
            bar = bar if self.progress else None
            self._bar = bar
            rounds_id = (
                bar.add_task(f"{cfg.rule} on {cfg.task}: rounds", total=cfg.rounds, completed=st.round)
                if bar is not None
                else None
            )
            for t in range(st.round + 1, cfg.rounds + 1):
                t_round = time.perf_counter()
                record = self._round(st, t, bar)
                self.end_round(st, t, record, t_round)
                if bar is not None:
                    bar.advance(rounds_id)
                    if "eval" in record:
                        bar.console.print(eval_line(t, record, self.task.main_metric))
        self._bar = None
        return self.finish(st)

    def export(self, st: ServerState) -> None:
        """The final global model as a peft adapter folder (+ head) relative to the pretrained weights."""
        totals = {}
        for n, shape in self.model.layer_shapes().items():
            d = st.layers[n].delta().float() if st.layers else torch.zeros(shape)  # no layers: no round ran
            totals[n] = d if st.base_offsets is None else d + st.base_offsets[n]
        export_adapter(
            self.store.path(ADAPTER), self.task.fresh_model(), totals, st.head, self.task.lora, self.task.export_info
        )

    def _summary(self, st: ServerState) -> dict[str, Any]:
        rows = self.store.metrics()
        last = rows[-1]
        metric = self.task.main_metric
        final = last.get("eval_personal") if self.rule.reports_personal else last.get("eval")
        return {
            "task": self.cfg.task,
            "rule": self.cfg.rule,
            "identity": self.cfg.identity(),
            "rounds": st.round,
            "main_metric": metric,
            "final": final,
            "final_global": last.get("eval"),
            "final_by_rank": last.get("eval_by_rank"),
            "final_personal": last.get("eval_personal"),
            "final_heldout_global": last.get("eval_heldout_global"),
            "final_heldout_personal": last.get("eval_heldout_personal"),
            "wall_seconds": st.elapsed,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "server_seconds_total": sum(r["server_seconds"] for r in rows),
        }


def _mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([c[k] for c in scores])) for k in scores[0]}


def _keep_personal(readout: LowRank, own: LowRank, personal: frozenset[str]) -> LowRank:
    """The readout with the client's own B and/or A where the rule keeps them on the client."""
    B = own.B if "B" in personal else readout.B
    A = own.A if "A" in personal else readout.A
    return LowRank(B, A, readout.scale)


def eval_line(t: int, record: dict[str, Any], metric: str) -> str:
    line = f"round {t}: {metric} {record['eval'][metric]:.4f}"
    if "eval_by_rank" in record:
        line += "  by rank: " + ", ".join(f"r{r} {m[metric]:.4f}" for r, m in record["eval_by_rank"].items())
    if "eval_personal" in record:
        line += f"  personal {record['eval_personal'][metric]:.4f}"
    if record["train_loss"] is None:
        return line + "  (untuned backbone)"
    return line + f"  (loss {record['train_loss']:.4f})"


def run_federation(cfg: RunConfig, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning run into ``out_dir``; returns its summary."""
    return Federation(cfg, out_dir, progress=progress).run(resume=resume)
