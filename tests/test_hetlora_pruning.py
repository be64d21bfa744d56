"""HetLoRA's rank self-pruning (issue: an accepted prune_gamma that did nothing): a client
whose trailing rank components shrink during local training drops them, one whose trailing
components grow keeps its rank; the penalty touches the trailing components only; a pruned
client uploads its smaller rank and keeps it in later rounds. Checked on the rule's hooks with
random factors, and on ``train_client`` with a tiny peft model that really trains."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from glora import LowRank, get_rule
from glora.aggregation.hetlora import kept_components, tail_size
from glora.federation.client import train_client
from glora.federation.config import RunConfig
from glora.models.lora import AdaptedModel, LoraSettings

LAYERS = {"q": (37, 23), "v": (19, 29)}  # non-square, different shapes


def random_adapter(rank: int, seed: int) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: LowRank(torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g), 2.0)
        for n, (d_out, d_in) in LAYERS.items()
    }


def rescaled(adapter: dict[str, LowRank], j: int, lead: float, tail: float) -> dict[str, LowRank]:
    """The adapter with B's leading j columns times ``lead`` and the rest times ``tail``."""
    out = {}
    for n, f in adapter.items():
        c = torch.full((f.rank,), tail)
        c[:j] = lead
        out[n] = LowRank(f.B * c, f.A.clone(), f.scale)
    return out


def test_kept_components_is_floor_of_the_ratio_and_at_least_one():
    assert [kept_components(k, 0.9) for k in (1, 2, 8, 10, 16)] == [1, 1, 7, 9, 14]
    assert kept_components(100, 0.29) == 29  # not 28: 0.29 * 100 is 28.999999999999996
    assert kept_components(8, 1.0) == 8  # prune_ratio 1: nothing trails


@pytest.mark.parametrize("ratio, j", [(0.9, 7), (0.5, 4)])
def test_a_client_whose_tail_shrank_prunes_and_one_whose_tail_grew_keeps_its_rank(ratio, j):
    rule = get_rule("hetlora", prune_gamma=0.1, prune_ratio=ratio)
    start = random_adapter(8, seed=0)
    # The leading components grow threefold in both cases: the update as a whole grows, so a
    # test on the whole update's norm, or on any part but the tail, would not tell them apart.
    shrank = rescaled(start, j, lead=3.0, tail=0.5)
    grew = rescaled(start, j, lead=3.0, tail=1.5)
    assert rule.pruned_rank(start, shrank) == j
    assert rule.pruned_rank(start, grew) == 8
    # Summed over layers: one layer's tail shrinking a little while the other's grows a lot keeps the rank.
    mixed = {"q": shrank["q"], "v": rescaled(start, j, lead=1.0, tail=4.0)["v"]}
    assert rule.pruned_rank(start, mixed) == 8


def test_self_pruning_is_off_by_default_and_at_prune_gamma_zero():
    start = random_adapter(8, seed=0)
    shrank = rescaled(start, 7, lead=1.0, tail=0.1)
    for rule in (get_rule("hetlora"), get_rule("hetlora", prune_gamma=0.0, prune_ratio=0.5)):
        assert rule.prune_gamma == 0
        assert rule.pruned_rank(start, shrank) == 8
        assert rule.local_penalty([(f.B, f.A) for f in start.values()]) is None


def test_penalty_is_gamma_times_the_tail_norms_and_moves_only_the_tail():
    rule = get_rule("hetlora", prune_gamma=0.3, prune_ratio=0.75)  # rank 8: components 6 and 7 trail
    adapter = random_adapter(8, seed=1)
    live = [(f.B.clone().requires_grad_(), f.A.clone().requires_grad_()) for f in adapter.values()]
    penalty = rule.local_penalty(live)
    expected = 0.3 * sum(f.B[:, 6:].norm() * f.A[6:].norm() for f in adapter.values())
    assert torch.allclose(penalty, expected)
    penalty.backward()
    for B, A in live:
        assert torch.count_nonzero(B.grad[:, :6]) == 0 and torch.count_nonzero(A.grad[:6]) == 0
        assert bool((B.grad[:, 6:].norm(dim=0) > 0).all()) and bool((A.grad[6:].norm(dim=1) > 0).all())
    assert float(tail_size(adapter["q"].B, adapter["q"].A, 8)) == 0.0  # nothing trails: size 0


def test_prune_options_are_checked():
    with pytest.raises(ValueError, match="prune_ratio must be in"):
        get_rule("hetlora", prune_ratio=0.0)
    with pytest.raises(ValueError, match="prune_gamma must be >= 0"):
        get_rule("hetlora", prune_gamma=-0.1)


# the round loop's half: train_client with a tiny model that really trains


class Tiny(nn.Module):
    """Two adapted layers (query, value) and a classification head; the loss is cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value, self.classifier = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x, labels=None):
        logits = self.classifier(torch.tanh(self.value(torch.tanh(self.query(x)))))
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


def tiny_client(prune_gamma: float):
    model = AdaptedModel(Tiny(), LoraSettings(("query", "value")), [8])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 6, generator=g)
    labels = (x[:, 0] > 0).long()
    task = SimpleNamespace(batch=lambda idx: {"x": x[torch.as_tensor(idx)], "labels": labels[torch.as_tensor(idx)]})
    cfg = RunConfig(rule="hetlora", rule_options={"prune_gamma": prune_gamma}, local_steps=40, batch_size=16, lr=1e-2)
    return model, task, cfg, get_rule("hetlora", prune_gamma=prune_gamma)


def readout(tail_B: float) -> dict[str, LowRank]:
    """A rank-8 start: random factors, the last column of B times ``tail_B``."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for n in ("query", "value"):
        B = 0.3 * torch.randn(6, 8, generator=g)
        B[:, 7] *= tail_B
        out[n] = LowRank(B, torch.randn(8, 6, generator=g) / 6**0.5, 2.0)
    return out


def test_train_client_prunes_a_client_whose_tail_shrinks_and_the_pruning_lasts():
    model, task, cfg, rule = tiny_client(prune_gamma=1.0)
    head = model.get_head(8)
    first = train_client(model, task, cfg, rule, 2, 0, np.arange(64), readout(tail_B=1.0), head)
    # The penalty shrank the last component (ratio 0.9 of rank 8 keeps 7): rank 7 goes up, and
    # the client keeps its factors to remember it.
    assert {f.rank for f in first.factors.values()} == {7}
    assert first.own is not None and {f.rank for f in first.own.factors.values()} == {7}
    # Next round the readout is rank 8 again; the client trains its 7 components, the 8th of
    # its adapter stays exactly zero, and it uploads at most rank 7.
    second = train_client(model, task, cfg, rule, 3, 0, np.arange(64), readout(tail_B=1.0), head, own=first.own)
    for f in model.get_factors(8).values():
        assert torch.count_nonzero(f.B[:, 7]) == 0 and torch.count_nonzero(f.A[7]) == 0
        assert bool((f.B[:, :7].norm(dim=0) > 0).all())
    assert {f.rank for f in second.factors.values()} <= {6, 7}


def test_train_client_keeps_the_rank_of_a_client_whose_tail_grows():
    # The same start under a penalty too weak to hold the last component back: the data grow
    # it (trailing size 1.45 -> 1.78), so the client keeps rank 8, uploads it and keeps nothing.
    model, task, cfg, rule = tiny_client(prune_gamma=1e-6)
    update = train_client(model, task, cfg, rule, 2, 0, np.arange(64), readout(tail_B=1.0), model.get_head(8))
    assert {f.rank for f in update.factors.values()} == {8} and update.own is None
    # A start whose last column of B is zero has a trailing size of zero, which training can
    # only grow (round 1's situation): no pruning even under the strong penalty.
    model, task, cfg, rule = tiny_client(prune_gamma=1.0)
    update = train_client(model, task, cfg, rule, 2, 0, np.arange(64), readout(tail_B=0.0), model.get_head(8))
    assert {f.rank for f in update.factors.values()} == {8} and update.own is None
    assert all(float(f.B[:, 7].norm()) > 0 for f in update.factors.values())


def test_train_client_without_pruning_uploads_the_full_rank():
    model, task, cfg, rule = tiny_client(prune_gamma=0.0)
    update = train_client(model, task, cfg, rule, 2, 0, np.arange(64), readout(tail_B=1.0), model.get_head(8))
    assert {f.rank for f in update.factors.values()} == {8} and update.own is None
