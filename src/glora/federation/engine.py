"""The federation's round arithmetic, shared by both drivers (the in-process simulation,
glora.federation.simulation, and the Flower app, glora.flower): what the server carries from
round to round, which clients a round samples and what each receives, the records of what a
client keeps and sends, the rule's aggregation, and the bytes each direction carries.

Nothing here loads data or models or writes files: a driver does that around these pieces.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glora.aggregation import ClientPlan, LayerState, Rule, average_params
from glora.aggregation.base import FACTORS
from glora.federation.config import RunConfig
from glora.lowrank import LowRank, lora_init_A
from glora.models.lora import AdaptedModel
from glora.tasks import FederatedTask


@dataclass
class ClientState:
    """What a client keeps between its rounds: its last trained factors (at the rank it kept,
    which a pruning rule may have made smaller than its adapter's), its head, and its adapter's
    rank."""

    factors: dict[str, LowRank]
    head: dict[str, torch.Tensor]
    rank: int

    @classmethod
    def of(cls, value: ClientState | Mapping[str, Any]) -> ClientState:
        """A client state, also from the plain dict that checkpoints of older versions hold."""
        return value if isinstance(value, ClientState) else cls(value["factors"], value["head"], value["rank"])


@dataclass
class ServerState:
    """Everything the loop carries from one round to the next (and checkpoints).

    ``personal``: each client's own state (:class:`ClientState`) by client index. A driver
    with a run folder holds it in a :class:`~glora.federation.client_store.ClientStore` (a
    file a client, loaded when read), which checkpoints name instead of copying; a plain dict
    keeps every state in memory."""

    round: int = 0
    layers: dict[str, LayerState] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    base_offsets: dict[str, torch.Tensor] | None = None
    personal: MutableMapping[int, ClientState] = field(default_factory=dict)
    elapsed: float = 0.0
    # What the state merged into the base weights at the end of the last round (layer -> the
    # rule's merge), computed once: the base takes it, and the next round's download counts it.
    # None: not computed (a checkpoint of an older version, or nothing merged yet).
    merges: dict[str, Any] | None = None


@dataclass
class ClientUpdate:
    """A client's answer to one round.

    factors: what the server aggregates, per layer (re-gauged under ``random_gauge``);
    head: the trained head; loss: mean training loss over the steps;
    own: what the client keeps for its next round (rules with personal factors or an
    unshared head, or a client that pruned its rank), else None.
    """

    factors: dict[str, LowRank]
    head: dict[str, torch.Tensor]
    loss: float
    own: ClientState | None = None


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
    """Local optimiser steps of a client holding ``n_examples``. The pooled client of a rule
    whose ``pooled_budget`` is "federation" takes the steps of every client sampled in a round
    (the examples the federation sees; under ``--local-epochs``, epochs over all the pooled
    data); of one whose budget is "client", one client's steps (under ``--local-epochs``,
    those of a client holding the mean share of the pooled data)."""
    federation = rule.pooled and rule.pooled_budget == "federation"
    if rule.pooled and not federation:
        n_examples = n_examples / cfg.clients
    if cfg.local_epochs is not None:
        return max(1, int(np.ceil(cfg.local_epochs * n_examples / cfg.batch_size)))
    per_round = max(1, round(cfg.fraction * cfg.clients)) if federation else 1
    return cfg.local_steps * per_round


def readout(st: ServerState, init: Mapping[int, Mapping[str, LowRank]], rank: int, scale: float) -> dict[str, LowRank]:
    """The adapter a client of this rank starts the round from: the state's readout, or the
    initial adapter before the first aggregation."""
    if st.layers:
        return {n: s.readout(rank, scale) for n, s in st.layers.items()}
    return dict(init[rank])


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
    bytes_up: int,
    sampled: int,
) -> dict[str, Any]:
    """The server half of a round: keep each client's own part, aggregate every layer with
    the rule, average the head where the rule shares it; returns the round's metrics row.
    ``bytes_down`` / ``bytes_up``: what the driver's transport carried to all ``sampled``
    clients (a client left out was still sent its readout) and from these ones (the
    in-process driver counts :func:`download_bytes` and :func:`upload_bytes`); per client,
    each is divided by the clients it went to."""
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
    return {
        "round": server_round,
        "clients": clients,
        "train_loss": float(np.average([u.loss for u in updates], weights=weights)),
        "server_seconds": server_seconds,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_up_per_client": bytes_up / len(clients),
        "bytes_down_per_client": bytes_down / sampled,
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


def round_merges(st: ServerState) -> dict[str, Any]:
    """What the state merges into the base weights (layer -> the rule's merge; layers that
    merge nothing left out): computed once a round, kept in ``st.merges``."""
    return {n: m for n, s in (st.layers or {}).items() if (m := s.merge()) is not None}


def _nbytes(x: LowRank | torch.Tensor | None, factors: frozenset[str] = frozenset({"A", "B"})) -> int:
    if x is None:
        return 0
    if isinstance(x, LowRank):
        return sum(t.numel() * t.element_size() for f, t in (("B", x.B), ("A", x.A)) if f in factors)
    return x.numel() * x.element_size()


def _head_bytes(head: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in head.values())
