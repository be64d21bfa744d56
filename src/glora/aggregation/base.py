"""The interface every server rule implements, and the input checks they share.

A rule has two halves:
- the client half, :meth:`Rule.client_plan`: which LoRA factors a client trains and
  sends this round, which it keeps as its own, whether the head is shared;
- the server half, :meth:`Rule.aggregate`: per adapted layer, the clients' updates and
  weights in, a :class:`LayerState` out. The state says what every client merges into
  its frozen base weights (:meth:`LayerState.merge`: FLoRA's stacked mean, FedEx-LoRA's
  dense residual) and which adapter it starts the next round from
  (:meth:`LayerState.readout`: a fresh one for merge-and-restart rules).
A rule may also shape local training (:meth:`Rule.local_penalty`, a term added to the
client's loss) and let a client drop trailing rank components after it
(:meth:`Rule.pruned_rank`); both do nothing by default (HetLoRA's rank self-pruning uses them).
The training loop asks the rule and the state; it never branches on the rule's name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from glora.lowrank import LowRank, lora_init_A

FACTORS = frozenset({"A", "B"})


@dataclass(frozen=True)
class ClientPlan:
    """What a client does in one round under a rule.

    train: the LoRA factors it trains ({"A", "B"}, {"B"} or {"A"}).
    send: the factors it uploads (the others stay on the client).
    personal: factors the client keeps from its own previous round instead of taking the
        server's readout (FedSA-LoRA keeps B).
    share_head: whether trainable non-LoRA parameters (a classification head) are
        averaged on the server.
    """

    train: frozenset[str] = FACTORS
    send: frozenset[str] = FACTORS
    personal: frozenset[str] = frozenset()
    share_head: bool = True


class LayerState(ABC):
    """The server's representation of one layer after a round."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the layer."""

    @abstractmethod
    def readout(self, rank: int, scale: float) -> LowRank:
        """The adapter a client of this rank and scale starts the next round from."""

    def merge(self) -> LowRank | Tensor | None:
        """What a client adds to its frozen base weight before the next round (None: nothing).

        Low-rank where the rule allows it, a dense (d_out, d_in) tensor where it does not.
        """
        return None

    @abstractmethod
    def delta(self) -> Tensor:
        """Dense (d_out, d_in) total update this state represents, base merge included.

        Small sizes only: tests and evaluation of small backbones.
        """

    def total(self) -> LowRank | Tensor:
        """The update :meth:`delta` stands for, as factors where the state holds it low-rank
        (so that exporting a large layer needs no dense matrix), else dense (d_out, d_in).
        Default: :meth:`delta`; states that keep factors override it."""
        return self.delta()

    def merged_delta(self) -> Tensor | None:
        """Dense form of :meth:`merge` (None when nothing is merged)."""
        m = self.merge()
        if m is None:
            return None
        return m.delta() if isinstance(m, LowRank) else m


class Rule(ABC):
    """A server aggregation rule. Subclasses set ``name`` and implement ``_aggregate``."""

    name: ClassVar[str]
    #: False for rules whose authors define them for equal client ranks only.
    accepts_unequal_ranks: ClassVar[bool] = True
    #: True for the centralized references: the loop pools every client's data into one client.
    pooled: ClassVar[bool] = False
    #: A pooled rule's step budget a round: "federation" (the steps of every client sampled in
    #: the round, so as many examples as the whole federation sees) or "client" (one client's
    #: steps, so as many sequential optimizer steps as one client takes over the run).
    pooled_budget: ClassVar[str] = "federation"
    #: True for the reference points of a table (centralized, local), not server rules: reports
    #: label them and leave them out of "the best federated rule".
    reference: ClassVar[bool] = False
    #: For ``--lr-per-rule``: the rule whose tuned rate this one takes where the tuning sweep has
    #: no run of its own (None: it needs its own).
    tuned_as: ClassVar[str | None] = None
    #: True where the rule's result is each client's own model (local-only, FedSA-LoRA):
    #: the loop then reports the mean of the clients' own models as the main metric.
    reports_personal: ClassVar[bool] = False
    # Whether clients may cut their own rank (:meth:`pruned_rank` below their adapter's).
    prunes: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.pooled_budget not in ("federation", "client"):
            raise TypeError(f"{cls.__name__}.pooled_budget is 'federation' or 'client', not {cls.pooled_budget!r}")

    def client_plan(self, server_round: int) -> ClientPlan:
        """What clients do in ``server_round`` (1-based). Default: train and send B and A."""
        return ClientPlan()

    def local_penalty(self, factors: Sequence[tuple[Tensor, Tensor]]) -> Tensor | None:
        """A term the client adds to its training loss at every local step, or None (the
        default: nothing). ``factors``: the live (B (d_out, k), A (k, d_in)) of every adapted
        layer, k the client's current rank (see :meth:`pruned_rank`); the term must be
        differentiable in them."""
        return None

    def pruned_rank(self, start: Mapping[str, LowRank], trained: Mapping[str, LowRank]) -> int:
        """The rank a client keeps after local training, from the adapter it started the round
        from and the one it trained (per layer, both of its current rank k). Below k, the client
        drops its trailing components: it uploads the leading ones and starts every later
        round from the leading ones of the readout. Default: k (nothing dropped)."""
        return next(iter(trained.values())).rank

    def aggregate(
        self,
        updates: Sequence[LowRank],
        weights: Sequence[float],
        previous: LayerState | None = None,
    ) -> LayerState:
        """Aggregate one layer: ``updates`` of the K clients, ``weights`` (example counts or
        any non-negative numbers, normalised here), ``previous`` the layer's last state.
        Raises ValueError naming the client and the problem for bad input."""
        w = normalize_weights(weights, len(updates))
        check_updates(updates, self.name, equal_ranks=not self.accepts_unequal_ranks)
        return self._aggregate(list(updates), w, previous)

    def aggregate_layers(
        self,
        updates: Mapping[str, Sequence[LowRank]],
        weights: Sequence[float],
        previous: Mapping[str, LayerState] | None = None,
    ) -> dict[str, LayerState]:
        """Aggregate every layer of a model: ``updates[layer][client]``."""
        previous = previous or {}
        return {name: self.aggregate(ups, weights, previous.get(name)) for name, ups in updates.items()}

    @abstractmethod
    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> LayerState:
        """The rule itself, on checked input; ``weights`` (K,) float64 sum to 1."""


def normalize_weights(weights: Sequence[float], n_clients: int) -> Tensor:
    """Client weights as a float64 tensor (K,) summing to 1. ValueError for bad input."""
    if n_clients == 0:
        raise ValueError("aggregate got an empty client list: at least one client update is needed")
    weights = [float(w) for w in weights]
    if len(weights) != n_clients:
        raise ValueError(f"got {len(weights)} weights for {n_clients} client updates: give one weight per client")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"client {i}: weight {w} is not finite")
        if w < 0:
            raise ValueError(f"client {i}: weight {w} is negative; weights must be >= 0 (e.g. example counts)")
    total = sum(weights)
    if total <= 0:
        raise ValueError("all client weights are zero: at least one client needs a positive weight")
    return torch.tensor(weights, dtype=torch.float64) / total


def check_updates(updates: Sequence[LowRank], rule: str, equal_ranks: bool = False) -> None:
    """ValueError naming the client for NaN/Inf factors, inconsistent shapes, or (when the
    rule requires it) unequal ranks."""
    if len(updates) == 0:
        raise ValueError("aggregate got an empty client list: at least one client update is needed")
    d_out, d_in = updates[0].B.shape[0], updates[0].A.shape[-1]
    for i, u in enumerate(updates):
        if u.B.ndim != 2 or u.A.ndim != 2:
            raise ValueError(f"client {i}: B and A must be 2-D, got shapes {tuple(u.B.shape)} and {tuple(u.A.shape)}")
        if u.B.shape[1] != u.A.shape[0]:
            raise ValueError(
                f"client {i}: B has rank {u.B.shape[1]} (shape {tuple(u.B.shape)}) but A has "
                f"{u.A.shape[0]} rows (shape {tuple(u.A.shape)}); B is (d_out, r) and A is (r, d_in)"
            )
        if (u.d_out, u.d_in) != (d_out, d_in):
            raise ValueError(
                f"client {i}: layer shape (d_out, d_in) = {u.shape} differs from client 0's {(d_out, d_in)}"
            )
        for fname, f in (("B", u.B), ("A", u.A)):
            if not bool(torch.isfinite(f).all()):
                raise ValueError(f"client {i}: factor {fname} contains NaN or Inf")
        if not math.isfinite(u.scale):
            raise ValueError(f"client {i}: scale {u.scale} is not finite")
    if equal_ranks:
        ranks = [u.rank for u in updates]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"rule {rule!r} needs equal client ranks but got ranks {ranks}; "
                "use one rank for all clients or a rule that accepts different ranks "
                "(glora, flora, flexlora, hetlora, florist)"
            )


def weighted_sum(tensors: Sequence[Tensor], weights: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_i weights[i] * tensors[i], accumulated in ``dtype``."""
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for w, t in zip(weights.tolist(), tensors, strict=True):
        out.add_(t.to(dtype), alpha=w)
    return out


def fresh_adapter(rank: int, d_out: int, d_in: int, scale: float, seed: int, dtype: torch.dtype) -> LowRank:
    """A standard LoRA initialisation (B = 0, A random) of the given rank, seeded.

    Used by merge-and-restart rules: the client has merged the update into its base
    weights and starts a new adapter. The same seed gives the same A, nested in rank.
    """
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.zeros(d_out, rank, dtype=dtype), lora_init_A(rank, d_in, g, dtype), scale)


def leading(f: LowRank, k: int) -> LowRank:
    """The first k components of ``f``: B (d_out, k), A (k, d_in); ``f`` itself when k >= its
    rank. Copies, not views: a view would carry (and a checkpoint save) all of f's storage."""
    if k >= f.rank:
        return f
    return LowRank(f.B[:, :k].clone(), f.A[:k].clone(), f.scale)


def within_rank(f: LowRank, k: int) -> LowRank:
    """``f`` at its own rank r with the components beyond k set to zero (B's columns and A's
    rows): a rank-k adapter in a rank-r slot. A zero column of B gets no gradient while the
    matching row of A is zero, and vice versa, and AdamW's decay keeps zero at zero, so local
    training leaves them at zero."""
    if k >= f.rank:
        return f
    B, A = f.B.clone(), f.A.clone()
    B[:, k:] = 0
    A[k:] = 0
    return LowRank(B, A, f.scale)


def common_scale(updates: Sequence[LowRank], weights: Tensor) -> float:
    """The scale factor-averaging rules apply to mean(B) @ mean(A): the weighted mean of the
    clients' scales (equal ranks with lora_alpha = 2r give one scale for all)."""
    return float(sum(w * u.scale for w, u in zip(weights.tolist(), updates, strict=True)))
