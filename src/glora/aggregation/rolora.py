"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA", NeurIPS 2025): alternate which factor is trained.

Odd rounds: clients train and send B with A frozen; even rounds: A with B frozen. The
frozen factor is the one every client got from the server, so averaging the trained one
is exact: sum_i w_i s_i B_i A = (sum_i w_i s_i B_i) A, and likewise for A.

Where we differ from the paper, and why:
- The paper counts one iteration as a B half-step followed by an A half-step, each
  with its own upload and aggregation; here each half-step is one server round (the
  same sequence of uploads, numbered one by one), so that each round's plan is one
  factor and the round loop needs no sub-rounds.
- B goes first: with the standard LoRA initialisation (B = 0) the gradient of A is
  zero, so an A half-step first would do nothing.
- Each client's scale is folded into the trained factor before averaging, which keeps
  the aggregate exact if the scales differ (with equal scales: the plain mean).

The server reads which factor was trained from the updates themselves (the frozen one is
identical across clients), so aggregation needs no round number; updates in which both
factors differ between clients break the protocol and get a ValueError.
"""

from __future__ import annotations

from torch import Tensor

from glora.aggregation.base import ClientPlan, LayerState, Rule, common_scale
from glora.aggregation.fedit import FactorState
from glora.aggregation.frozen import is_shared, mean_scaled
from glora.lowrank import LowRank


class RoLoRA(Rule):
    """Alternating B / A rounds, each averaged exactly; equal ranks only. Round 1 starts every
    client from the same seeded A (the training loop's common initialisation)."""

    name = "rolora"
    accepts_unequal_ranks = False

    def client_plan(self, server_round: int) -> ClientPlan:
        if server_round < 1:
            raise ValueError(f"rolora: server rounds are numbered from 1, got {server_round}")
        factor = frozenset({"B"}) if server_round % 2 == 1 else frozenset({"A"})
        return ClientPlan(train=factor, send=factor)

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> FactorState:
        shared_B, shared_A = is_shared(updates, "B"), is_shared(updates, "A")
        if not (shared_A or shared_B):
            raise ValueError(
                "rule 'rolora': the clients' B and A both differ, but each RoLoRA round trains one factor with "
                "the other frozen at the server's value (client_plan says which); send back the frozen one untrained"
            )
        scale = common_scale(updates, weights)
        scales = [u.scale for u in updates]
        if shared_A:  # a B round (or nothing trained at all, e.g. round 0): average B
            B, A = mean_scaled([u.B for u in updates], scales, weights, scale), updates[0].A.clone()
        else:  # an A round: average A
            B, A = updates[0].B.clone(), mean_scaled([u.A for u in updates], scales, weights, scale)
        return FactorState(LowRank(B, A, scale))
