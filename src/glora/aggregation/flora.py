"""FLoRA (Wang, Shen, He, Sun, Wang, Lyu, Li, "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024): stack, merge, restart.

The server stacks the clients' factors,
    B = [B_1 | ... | B_K]  (d_out, sum r_i),   A = [w_1 s_1 A_1; ...; w_K s_K A_K]  (sum r_i, d_in),
so that B @ A = sum_i w_i s_i B_i A_i, the exact weighted mean update, as one adapter of
rank sum r_i and whatever the clients' ranks. Every client adds B @ A to its frozen base
weight and starts the next round from a fresh LoRA adapter of its own rank.

The weights go into the A blocks (which side holds them does not change B @ A); each
client's LoRA scale s_i, implicit in the paper's B_k A_k, goes there too, so the stacked
pair carries scale 1 and stays exact when the clients' scales differ. The
stacked pair is what is sent down, so the download grows with the number of clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule, fresh_adapter
from glora.lowrank import LowRank


@dataclass(frozen=True)
class StackedState(LayerState):
    """A merged update (``stacked``, scale 1) plus a fresh adapter for the next round.

    ``seed`` draws the fresh adapter's A; ``out_dtype`` is the clients' dtype.
    """

    stacked: LowRank
    out_dtype: torch.dtype
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.stacked.shape

    @property
    def rank(self) -> int:
        return self.stacked.rank

    def readout(self, rank: int, scale: float) -> LowRank:
        if rank < 1:
            raise ValueError(f"readout rank must be >= 1, got {rank}")
        d_out, d_in = self.shape
        return fresh_adapter(rank, d_out, d_in, scale, self.seed, self.out_dtype)

    def merge(self) -> LowRank:
        return self.stacked

    def total(self) -> LowRank:
        return self.stacked

    def delta(self) -> Tensor:
        return self.stacked.delta()


def stack_updates(updates: list[LowRank], weights: Tensor) -> LowRank:
    """The exact weighted mean as one adapter of rank sum r_i and scale 1.

    Shapes: B (d_out, sum r_i), A (sum r_i, d_in), in the clients' dtype; the products
    w_i * s_i * A_i are formed in float64."""
    dtype = updates[0].dtype
    B = torch.cat([u.B for u in updates], dim=1)
    A = torch.cat([(u.A.double() * (w * u.scale)).to(dtype) for w, u in zip(weights.tolist(), updates, strict=True)])
    return LowRank(B, A, 1.0)


class FLoRA(Rule):
    """Stacking aggregation, merged into the base weights every round; any client ranks.

    seed: seed of the fresh adapters; it advances by one every round (taken from the
        previous state), so each round's fresh A is a new draw, the same on every client.
    """

    name = "flora"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> StackedState:
        seed = previous.seed + 1 if isinstance(previous, StackedState) else self.seed
        return StackedState(stack_updates(updates, weights), out_dtype=updates[0].dtype, seed=seed)
