"""FFA-LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024): federated LoRA with A frozen.

Every client starts from the same A, a seeded random initialisation that nobody trains,
and trains and sends B only. Since A is shared, the weighted mean of the B's is exact:
sum_i w_i s_i B_i A = (sum_i w_i s_i B_i) A. The paper also fixes the LoRA scale (it
reports FFA-LoRA to be insensitive to it); that is a training-loop setting, not a server
step. Our one addition: each client's scale s_i is folded into its B before averaging,
so the aggregate stays exact if the clients' scales differ (with equal scales it is the
paper's plain mean of B).

The training loop starts every client from the same seeded A (B = 0); the server checks
that the A's it receives are identical, since a client that trained or re-drew A would
break exactness silently.
"""

from __future__ import annotations

from torch import Tensor

from glora.aggregation.base import ClientPlan, LayerState, Rule, common_scale
from glora.aggregation.fedit import FactorState
from glora.aggregation.frozen import check_shared, mean_scaled
from glora.lowrank import LowRank


class FFALoRA(Rule):
    """Train and send B only; A is frozen at a shared seeded initialisation; equal ranks only."""

    name = "ffa-lora"
    accepts_unequal_ranks = False

    def client_plan(self, server_round: int) -> ClientPlan:
        return ClientPlan(train=frozenset({"B"}), send=frozenset({"B"}))

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> FactorState:
        check_shared(updates, "A", self.name)
        scale = common_scale(updates, weights)
        B = mean_scaled([u.B for u in updates], [u.scale for u in updates], weights, scale)
        return FactorState(LowRank(B, updates[0].A.clone(), scale))
