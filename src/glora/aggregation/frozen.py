"""Aggregation when one LoRA factor is frozen and shared by every client (FFA-LoRA's A,
RoLoRA's factor of the other half-step): averaging the trained factor is then exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora.aggregation.base import weighted_sum
from glora.lowrank import LowRank


def is_shared(updates: Sequence[LowRank], factor: str) -> bool:
    """Whether every client holds exactly the same ``factor`` ("A" or "B")."""
    ref = getattr(updates[0], factor)
    return all(torch.equal(getattr(u, factor), ref) for u in updates[1:])


def check_shared(updates: Sequence[LowRank], factor: str, rule: str) -> None:
    """ValueError naming the first client whose ``factor`` ("A" or "B") differs from client 0's."""
    ref = getattr(updates[0], factor)
    for i, u in enumerate(updates[1:], start=1):
        if not torch.equal(getattr(u, factor), ref):
            raise ValueError(
                f"rule {rule!r}: client {i}'s {factor} differs from client 0's, but this rule freezes {factor} "
                f"at one shared value: every client must send back the {factor} it was given, untrained"
            )


def mean_scaled(factors: Sequence[Tensor], scales: Sequence[float], weights: Tensor, scale: float) -> Tensor:
    """sum_i weights[i] * scales[i] / scale * factors[i], accumulated in float64 and returned
    in factors[0]'s dtype. Shapes: every factor alike, (d_out, r) or (r, d_in).

    Folding each client's scale into its trained factor keeps ``scale * trained @ shared``
    (or ``scale * shared @ trained``) equal to the weighted mean update when the clients'
    scales differ; with equal scales it is the plain weighted mean."""
    if scale <= 0:
        raise ValueError(f"the clients' mean LoRA scale is {scale}; scales must be > 0 (lora_alpha / r)")
    coeff = weights * torch.tensor(list(scales), dtype=torch.float64) / scale
    return weighted_sum(factors, coeff, torch.float64).to(factors[0].dtype)
