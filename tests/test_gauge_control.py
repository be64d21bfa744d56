"""The random-gauge control (``random_gauge``): each client re-gauges its factors before
upload, which changes the factors and leaves its dense update unchanged. Checked on the
gauge itself and on the code path of the round loop (``Federation._round`` and the
``train_client`` it calls) with the model and the local training replaced by fixed
"trained" factors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glora.federation import client as client_module
from glora.federation.config import RunConfig
from glora.federation.engine import ServerState
from glora.federation.simulation import Federation
from glora.lowrank import LowRank, random_gauge_matrix

D_OUT, D_IN, SCALE = 24, 16, 2.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 2, 5, 16])
def test_random_gauge_keeps_the_update_and_changes_the_factors(rank, dtype):
    g = torch.Generator().manual_seed(rank)
    f = LowRank(torch.randn(D_OUT, rank, generator=g, dtype=dtype), torch.randn(rank, D_IN, generator=g, dtype=dtype))
    G = random_gauge_matrix(rank, torch.Generator().manual_seed(7))
    regauged = f.gauge(G)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(regauged.delta(), f.delta()) < tol
    if rank > 1:  # a rank-1 gauge is a scalar: it rescales B and A, no more
        assert _rel(regauged.B, f.B) > 0.1 and _rel(regauged.A, f.A) > 0.1


class FakeModel:
    """The part of AdaptedModel the round loop uses; "training" leaves fixed factors per rank."""

    settings = SimpleNamespace(scale=lambda r: SCALE)
    peft = None  # handed to local_train, which the tests replace

    def __init__(self, ranks: list[int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.trained = {
            r: {
                name: LowRank(torch.randn(D_OUT, r, generator=g), torch.randn(r, D_IN, generator=g), SCALE)
                for name in ("layer.query", "layer.value")
            }
            for r in sorted(set(ranks))
        }

    def set_factors(self, r, factors) -> None: ...

    def set_head(self, r, head) -> None: ...

    def activate(self, r, train) -> list:
        return []

    def head_parameters(self, r) -> list:
        return []

    def get_factors(self, r) -> dict[str, LowRank]:
        return dict(self.trained[r])

    def get_head(self, r) -> dict[str, torch.Tensor]:
        return {"w": torch.full((3,), float(r))}


def _round(tmp_path, monkeypatch, rule: str, ranks: str, random_gauge: bool):
    """One server round of 3 clients; returns the model, the clients' uploads and the new state."""
    cfg = RunConfig(rule=rule, clients=3, ranks=ranks, random_gauge=random_gauge, seed=3)
    fed = Federation(cfg, tmp_path / f"{rule}-{random_gauge}", progress=False)
    fed.ranks = cfg.client_ranks()
    fed.parts = [np.arange(10), np.arange(10, 30), np.arange(30, 60)]
    fed.sizes = np.array([10.0, 20.0, 30.0])
    fed.model = FakeModel(fed.ranks)
    fed.task = SimpleNamespace(batch=None)
    fed.init = {
        r: {n: LowRank(torch.zeros(D_OUT, r), torch.randn(r, D_IN), SCALE) for n in ("layer.query", "layer.value")}
        for r in set(fed.ranks)
    }
    monkeypatch.setattr(client_module, "local_train", lambda *args, **kwargs: [0.5])
    uploads = {}
    aggregate = fed.rule.aggregate_layers

    def spy(updates, weights, previous=None):
        uploads.update(updates)
        return aggregate(updates, weights, previous=previous)

    fed.rule.aggregate_layers = spy
    st = ServerState(head={"w": torch.zeros(3)})
    fed._round(st, 1, None)
    return fed, uploads, st


@pytest.mark.parametrize("rule, ranks", [("glora", "2,4,8"), ("fedit", "4")])
def test_round_uploads_the_trained_update_in_a_random_gauge(tmp_path, monkeypatch, rule, ranks):
    fed, uploads, _ = _round(tmp_path, monkeypatch, rule, ranks, random_gauge=True)
    for name, ups in uploads.items():
        assert len(ups) == 3
        for client, up in enumerate(ups):
            trained = fed.model.trained[fed.ranks[client]][name]
            assert _rel(up.delta(), trained.delta()) < 1e-5  # the update the client trained
            assert _rel(up.B, trained.B) > 0.1  # in another gauge
    # Without the control, the uploads are the trained factors themselves.
    fed, uploads, _ = _round(tmp_path, monkeypatch, rule, ranks, random_gauge=False)
    for name, ups in uploads.items():
        for client, up in enumerate(ups):
            trained = fed.model.trained[fed.ranks[client]][name]
            assert torch.equal(up.B, trained.B) and torch.equal(up.A, trained.A)


def test_the_control_leaves_glora_and_moves_fedit(tmp_path, monkeypatch):
    # Equal rank 4 so that both rules run on the same uploads: GLoRA aggregates updates, so the
    # gauge changes nothing; FedIT averages factors, so it does (the control's expected outcome).
    for rule, changes in (("glora", False), ("fedit", True)):
        _, _, off = _round(tmp_path, monkeypatch, rule, "4", random_gauge=False)
        _, _, on = _round(tmp_path, monkeypatch, rule, "4", random_gauge=True)
        for name in off.layers:
            err = _rel(on.layers[name].delta(), off.layers[name].delta())
            assert (err > 0.05) if changes else (err < 1e-4), (rule, name, err)
