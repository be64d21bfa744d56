"""The two reference points every table carries, as rules so that the same command runs them.

- ``centralized``: LoRA on the pooled training data of all clients (the upper reference).
  The round loop pools the partition into one client that takes every client's steps,
  so the step budget equals the federation's.
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
    """One client holding everyone's data: its update is aggregated exactly (K = 1)."""

    name = "centralized"
    pooled = True  # the loop pools every client into one of the largest rank, so any ranks run


class LocalOnly(GLoRA):
    """No collaboration: nothing is sent, every factor and the head stay on the client."""

    name = "local"
    reports_personal = True

    def __init__(self) -> None:
        # A server rank no client set can reach: the state is the exact mean, any ranks.
        super().__init__(rank=1 << 20)

    legacy_options: ClassVar[dict[str, object]] = {}  # no options: it always holds the exact mean

    def client_plan(self, server_round: int) -> ClientPlan:
        return ClientPlan(send=frozenset(), personal=frozenset({"A", "B"}), share_head=False)
