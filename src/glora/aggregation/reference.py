"""The reference points every table carries, as rules so that the same command runs them.

- ``centralized``: LoRA on the pooled training data of all clients (the upper reference).
  The round loop pools the partition into one client that takes every sampled client's
  steps, so it sees as many examples as the whole federation.
- ``centralized-steps``: the same pooled data at one client's step budget (``local_steps``
  a round), so as many sequential optimizer steps as one client takes over the run: the
  upper reference for the depth of training, where ``centralized`` is the one for its width.
- ``local``: every client trains alone on its own data for all rounds and keeps its
  adapter and head (the lower reference); the metric is the mean over the clients' own
  models. The server state, the exact weighted mean of the local updates, is only
  reported as the "global" model (a one-shot average).
"""

from __future__ import annotations

from typing import ClassVar

from glora.aggregation.base import ClientPlan
from glora.aggregation.fedit import FedIT
from glora.aggregation.glora import GLoRA


class Centralized(FedIT):
    """Pooled data at the examples the whole federation sees (every sampled client's steps)."""

    name = "centralized"
    pooled = True  # the loop pools every client into one of the largest rank, so any ranks run
    reference = True


class CentralizedSteps(Centralized):
    """Pooled data at one client's sequential optimizer steps (``local_steps`` a round)."""

    name = "centralized-steps"
    pooled_budget = "client"
    # The same optimisation on the same pooled data as ``centralized``, on a shorter budget: its
    # rate is that reference's tuned rate (a rate tuned for this budget could score higher).
    tuned_as = "centralized"


class LocalOnly(GLoRA):
    """No collaboration: each client trains alone and keeps its own model (the lower reference)."""

    name = "local"
    reports_personal = True
    reference = True

    def __init__(self) -> None:
        # A server rank no client set can reach: the state is the exact mean, any ranks.
        super().__init__(rank=1 << 20)

    legacy_options: ClassVar[dict[str, object]] = {}  # no options: it always holds the exact mean

    def client_plan(self, server_round: int) -> ClientPlan:
        return ClientPlan(send=frozenset(), personal=frozenset({"A", "B"}), share_head=False)
