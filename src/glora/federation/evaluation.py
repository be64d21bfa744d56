"""What the server scores of a run: the global model, the model a client of each rank
receives, each client's own model (personalised rules) and the clients' held-out shares.
Dense updates are formed only here, for the duration of an evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from glora.aggregation import Rule
from glora.federation.config import RunConfig
from glora.federation.engine import ClientState, ServerState
from glora.models.lora import AdaptedModel
from glora.tasks import FederatedTask


class Evaluation:
    """The evaluations of one run. ``ranks``: each client's rank; ``held``: each client's
    held-out share of its own data (``--personal-holdout``; empty arrays where none)."""

    def __init__(
        self,
        cfg: RunConfig,
        rule: Rule,
        task: FederatedTask,
        model: AdaptedModel,
        ranks: list[int],
        held: list[np.ndarray],
    ) -> None:
        self.cfg, self.rule, self.task, self.model, self.ranks, self.held = cfg, rule, task, model, ranks, held

    def after_round(self, st: ServerState, bar: Progress | None = None) -> dict[str, Any]:
        """The global model (base + the state's full delta()) and the model a client of each
        rank receives (base + merge + its readout): for unequal ranks always, for equal ranks
        where it differs from the global model (a state larger than the clients' rank, as
        FlexLoRA's mean of rank up to the sum of theirs), so that no rule is scored only on a
        model no client holds."""
        out: dict[str, Any] = {}
        ranks = sorted(set(self.ranks)) if self.cfg.eval_ranks else []
        # A line in the run's progress display: evaluations (generation above all) take minutes.
        task_id = bar.add_task("  evaluating: global model", total=1 + len(ranks)) if bar is not None else None
        with self.global_model(st) as m:
            out["eval"] = self.task.evaluate(m)
        by_rank = {}
        total = {n: s.delta() for n, s in st.layers.items()} if len(ranks) == 1 else None
        for r, deltas in self.received_deltas(st) if ranks else ():
            if bar is not None:
                bar.update(task_id, advance=1, description=f"  evaluating: a rank-{r} client's model")
            if total is not None and all(torch.allclose(deltas[n], total[n], rtol=1e-5, atol=1e-9) for n in total):
                continue  # the clients' one rank receives the global model itself
            with self.model.dense_update(deltas, self.ranks[0], st.head) as m:
                by_rank[str(r)] = self.task.evaluate(m)
        if bar is not None:
            bar.remove_task(task_id)
        if by_rank:
            out["eval_by_rank"] = by_rank
        return out

    def global_model(self, st: ServerState) -> AbstractContextManager[torch.nn.Module]:
        """The global model (base + the state's full delta() + the shared head) for the
        duration of a ``with`` block."""
        return self.model.dense_update({n: s.delta() for n, s in st.layers.items()}, self.ranks[0], st.head)

    def received_deltas(self, st: ServerState) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(rank, dense update per layer) of what a client of each rank receives: what was
        merged into the base plus the state's readout at its rank; one rank at a time."""
        merged = _merged_deltas(st)
        for r in sorted(set(self.ranks)):
            scale = self.model.settings.scale(r)
            yield r, {n: _plus(s.readout(r, scale).delta(), merged[n]) for n, s in st.layers.items()}

    def held_out(self, st: ServerState) -> dict[str, Any]:
        """On each client's held-out share of its own data, the mean over clients of: the
        global model's score ("eval_heldout_global") and, for personalised rules, the client's
        own model's ("eval_heldout_personal")."""
        clients = [i for i, h in enumerate(self.held) if len(h)]
        if not clients:
            return {}  # no client holds two examples: nothing was held out
        with self.global_model(st) as m:
            scores = [self.task.evaluate_examples(m, self.held[i]) for i in clients]
        out = {"eval_heldout_global": _mean_scores(scores)}
        if self.rule.reports_personal:
            merged = _merged_deltas(st)
            own_scores = []
            for i in (i for i in clients if i in st.personal):  # a client never sampled has no model
                with self.own_model(st.personal[i], merged) as m:
                    own_scores.append(self.task.evaluate_examples(m, self.held[i]))
            if own_scores:
                out["eval_heldout_personal"] = _mean_scores(own_scores)
        return out

    def personal_clients(self, st: ServerState, server_round: int) -> list[int]:
        """The clients whose own models an evaluation after ``server_round`` scores: every
        client that holds one at the last round or without ``--eval-clients``, else a sample
        of that many, seeded by the run's seed and the round (sorted client indices)."""
        holders = sorted(st.personal)  # a client never sampled has no model
        n = self.cfg.eval_clients
        if n is None or server_round == self.cfg.rounds or n >= len(holders):
            return holders
        rng = np.random.default_rng([self.cfg.seed, server_round, 29])
        return sorted(int(holders[k]) for k in rng.choice(len(holders), size=n, replace=False))

    def personal(self, st: ServerState, clients: list[int] | None = None) -> dict[str, float]:
        """Mean over ``clients`` (default: all that hold one) of each client's own model (its
        last trained factors and head). One client's state is loaded at a time."""
        per_client = []
        merged = _merged_deltas(st)
        for i in sorted(st.personal) if clients is None else clients:
            with self.own_model(st.personal[i], merged) as m:
                per_client.append(self.task.evaluate(m))
        return _mean_scores(per_client)

    def own_model(
        self, own: ClientState, merged: Mapping[str, torch.Tensor | None]
    ) -> AbstractContextManager[torch.nn.Module]:
        """A client's own model (base + what was merged + its last trained factors, its head)
        for the duration of a ``with`` block; ``merged``: :func:`_merged_deltas` of the state."""
        deltas = {n: _plus(f.delta(), merged[n]) for n, f in own.factors.items()}
        return self.model.dense_update(deltas, own.rank, own.head)


def _merged_deltas(st: ServerState) -> dict[str, torch.Tensor | None]:
    """Each layer's dense base merge of this round (None where the rule merges nothing),
    computed once for all the models an evaluation builds on it."""
    return {n: s.merged_delta() for n, s in st.layers.items()}


def _plus(delta: torch.Tensor, merged: torch.Tensor | None) -> torch.Tensor:
    return delta if merged is None else delta + merged


def _mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([c[k] for c in scores])) for k in scores[0]}
