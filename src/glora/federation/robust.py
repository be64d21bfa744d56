"""A round's client updates screened before the rule aggregates them, the same in both
drivers: a client whose training raised or whose update is not finite is left out (or stops
the run, ``--on-client-error abort``), a round that loses more than ``--max-failed-fraction``
of its clients stops the run, and ``--clip-update-norm`` bounds each client's update by a
multiple of the round's median client norm (an outlier cannot move the aggregate further).

Norm clipping to a multiple of the median is the server-side defence of robust FL (e.g. Sun et
al., "Can You Really Backdoor Federated Learning?", 2019, norm bounding); written here because
it has to act on LoRA factors without forming the dense update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from glora.federation.engine import ClientUpdate
from glora.lowrank import LowRank


def update_problem(update: ClientUpdate) -> str | None:
    """Why ``update`` cannot be aggregated (a training loss, factor or head entry that is NaN
    or Inf, naming the layer), or None."""
    if not math.isfinite(update.loss):
        return f"its training loss is {update.loss} (training diverged)"
    for name, f in update.factors.items():
        for factor, t in (("B", f.B), ("A", f.A)):
            if not bool(torch.isfinite(t).all()):
                return f"layer {name}: factor {factor} contains NaN or Inf"
    for key, t in update.head.items():
        if not bool(torch.isfinite(t).all()):
            return f"head {key} contains NaN or Inf"
    return None


def update_norm(factors: Mapping[str, LowRank]) -> float:
    """The Frobenius norm of a client's whole dense update (every layer's scale x B A),
    from the factors: ||B A||_F^2 = trace((B^T B)(A A^T)), r x r products only."""
    total = 0.0
    for f in factors.values():
        B, A = f.B.double(), f.A.double()
        total += f.scale**2 * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0))
    return math.sqrt(total)


def clip_updates(updates: list[ClientUpdate], multiple: float, scalable: frozenset[str]) -> list[float]:
    """Scale, in place, every update whose :func:`update_norm` exceeds ``multiple`` x the
    median over ``updates`` down to that bound; returns each update's norm before clipping.
    ``scalable``: the factors the client both trained and sent (B where it may): a factor the
    rule keeps frozen and shared stays as the server sent it, and a personal one (FedSA-LoRA's
    B) is never the one scaled, since the server would not aggregate the change.

    A median bound needs an honest majority: with two clients, or with outliers making up
    half the round, the median is itself an outlier's norm or beyond it."""
    norms = [update_norm(u.factors) for u in updates]
    bound = clip_bound(norms, multiple)
    factor = "B" if "B" in scalable else "A"
    for u, norm in zip(updates, norms, strict=True):
        if norm > bound > 0:
            c = bound / norm
            u.factors = {n: replace(f, **{factor: getattr(f, factor) * c}) for n, f in u.factors.items()}
    return norms


def clip_bound(norms: list[float], multiple: float) -> float:
    """The largest update norm a round keeps: ``multiple`` x the median client norm."""
    return multiple * float(np.median(norms))


@dataclass
class Settled:
    """The clients whose updates a round aggregates, and those it left out with the reason."""

    clients: list[int]
    updates: list[ClientUpdate]
    weights: list[float]
    left_out: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)  # client -> its norm over the bound

    def notes(self) -> dict[str, dict[str, Any]]:
        """What the round's metrics row says of the clients left out and clipped (none: {})."""
        out: dict[str, dict[str, Any]] = {}
        if self.left_out:
            out["left_out"] = {str(i): reason for i, reason in sorted(self.left_out.items())}
        if self.clipped:
            out["clipped"] = {str(i): ratio for i, ratio in self.clipped.items()}
        return out


def settle_round(
    server_round: int,
    sampled: int,
    clients: list[int],
    updates: list[ClientUpdate],
    weights: list[float],
    left_out: Mapping[int, str],
    on_error: str,
    max_failed_fraction: float,
    clip_multiple: float | None,
    scalable: frozenset[str],
) -> Settled:
    """The updates of round ``server_round`` that the rule may aggregate.

    ``left_out``: clients the driver already lost (training raised, no reply, a bad reply),
    with the reason; updates that are not finite join them. ValueError (the run stops, its
    last checkpoint kept) under ``on_error="abort"`` when any client is left out, and always
    when more than ``max_failed_fraction`` of the ``sampled`` clients are, or all of them.
    """
    left = dict(left_out)
    keep = []
    for i, u, w in zip(clients, updates, weights, strict=True):
        problem = update_problem(u)
        if problem is None:
            keep.append((i, u, w))
        else:
            left[i] = problem
    reasons = "; ".join(f"client {i}: {r}" for i, r in sorted(left.items()))
    if left and on_error == "abort":
        raise ValueError(f"round {server_round}: {reasons} (on-client-error abort stops the run)")
    if not keep or len(left) > max_failed_fraction * sampled:
        raise ValueError(
            f"round {server_round}: {len(left)} of {sampled} clients failed, more than max-failed-fraction "
            f"{max_failed_fraction}: {reasons}. The run stops; its last checkpoint is kept for a resume"
        )
    settled = Settled([i for i, _, _ in keep], [u for _, u, _ in keep], [w for _, _, w in keep], left)
    if clip_multiple is not None:
        norms = clip_updates(settled.updates, clip_multiple, scalable)
        bound = clip_bound(norms, clip_multiple)
        settled.clipped = {i: n / bound for i, n in zip(settled.clients, norms, strict=True) if n > bound > 0}
    return settled
