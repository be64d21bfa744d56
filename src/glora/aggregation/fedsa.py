"""FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank
Adaptation in Federated Learning", ICLR 2025): share A, keep B on the client.

The paper's finding is that the A matrices learn what clients have in common and the
B matrices what is specific to each, so clients train both, send only A, and keep B
and the classification head as their own; the server averages A:
A = sum_i w_i A_i. Each client then trains from (its own B, the mean A): the plan's
``personal={"B"}`` tells the training loop to keep the client's B over the readout's.

In our simulation the server still receives every client's full adapter. It uses the
weighted mean of the B's for one thing only: the "averaged model" (mean B, mean A) that
``readout`` and ``delta`` describe, evaluated on the global test set; the paper's own
metric is each client's personalised model on its own test share (hence
``reports_personal``). The mean B never reaches a client.
"""

from __future__ import annotations

from torch import Tensor

from glora.aggregation.base import ClientPlan, LayerState, Rule
from glora.aggregation.fedit import FactorState, average_factors
from glora.lowrank import LowRank


class FedSALoRA(Rule):
    """Average A only; B and the head stay personal; equal ranks only."""

    name = "fedsa-lora"
    accepts_unequal_ranks = False
    reports_personal = True

    def client_plan(self, server_round: int) -> ClientPlan:
        return ClientPlan(send=frozenset({"A"}), personal=frozenset({"B"}), share_head=False)

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> FactorState:
        return FactorState(average_factors(updates, weights))
