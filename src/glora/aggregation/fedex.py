"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated
and Efficient Fine-Tuning of Foundation Models", ACL 2025): FedIT plus the dense residual
that makes the round exact.

The server averages B and A as FedIT does and computes the residual
    R = sum_i w_i s_i B_i A_i - s B A        (d_out, d_in),
where B, A are the averaged factors and s the clients' mean scale. Every client adds R
to its frozen base weight and continues training from (B, A), so base + adapter carries
exactly the weighted mean update.

Where we differ from the public reference code: it builds the residual transposed,
(d_in, d_out), which only goes unnoticed for square layers; here it is (d_out, d_in), the
shape of the weight it is added to. The residual uses each client's own scale s_i, so
it stays exact if the scales differ (the paper has one scale for all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule
from glora.aggregation.fedit import FactorState, average_factors
from glora.aggregation.flexlora import dense_mean
from glora.lowrank import LowRank


class FedExLoRA(Rule):
    """FedIT's averaged factors plus the dense residual merged into the base weights; equal ranks only."""

    name = "fedex-lora"
    accepts_unequal_ranks = False

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> FactorState:
        avg = average_factors(updates, weights)
        # The residual is taken against the averaged factors as the clients will hold them
        # (in their dtype), so base + adapter is the mean up to the residual's own rounding.
        residual = dense_mean(updates, weights, torch.float64).addmm_(avg.B.double() * -avg.scale, avg.A.double())
        return FactorState(avg, residual.to(avg.dtype))
