"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024): FedAvg applied to the LoRA factors separately.

B = sum_i w_i B_i and A = sum_i w_i A_i. The product mean(B) @ mean(A) is not the mean
update and depends on each client's gauge: the contrast GLoRA is built against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule, common_scale, weighted_sum
from glora.lowrank import LowRank


@dataclass(frozen=True)
class FactorState(LayerState):
    """An adapter held as factors: Delta = scale * B @ A, plus an optional dense
    ``residual`` (d_out, d_in) merged into the base weights (FedEx-LoRA)."""

    adapter: LowRank
    residual: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.adapter.shape

    def readout(self, rank: int, scale: float) -> LowRank:
        if rank != self.adapter.rank:
            raise ValueError(
                f"this state holds a rank-{self.adapter.rank} adapter and cannot be read out at rank {rank}; "
                "factor-averaging rules need every client at the same rank"
            )
        # Same update at the client's scale: s_client * B' A = s * B A.
        return LowRank(self.adapter.B * (self.adapter.scale / scale), self.adapter.A.clone(), scale)

    def merge(self) -> Tensor | None:
        return self.residual

    def total(self) -> LowRank | Tensor:
        return self.adapter if self.residual is None else self.delta()

    def delta(self) -> Tensor:
        d = self.adapter.delta()
        return d if self.residual is None else d + self.residual


def average_factors(updates: list[LowRank], weights: Tensor) -> LowRank:
    """Weighted means of B and of A (each accumulated in float64, returned in the clients' dtype)."""
    dtype = updates[0].dtype
    B = weighted_sum([u.B for u in updates], weights, torch.float64).to(dtype)
    A = weighted_sum([u.A for u in updates], weights, torch.float64).to(dtype)
    return LowRank(B, A, common_scale(updates, weights))


class FedIT(Rule):
    """FedAvg of B and A separately; equal ranks only."""

    name = "fedit"
    accepts_unequal_ranks = False

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> FactorState:
        return FactorState(average_factors(updates, weights))
