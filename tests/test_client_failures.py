"""A federation survives a bad client (issue #30): a client whose training diverges or raises
is left out of its round with its id, round and layer, the run finishes its rounds, a round
that loses too many clients stops the run, an outlier's update is clipped, and a node cannot
inflate its weight with a false example count."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from glora import tasks
from glora.aggregation import get_rule
from glora.federation import client as client_module
from glora.federation.config import RunConfig
from glora.federation.engine import ClientUpdate
from glora.federation.robust import clip_updates, settle_round, update_norm
from glora.federation.simulation import run_federation
from glora.lowrank import LowRank
from tests.test_own_data import ToyTask


def lowrank(seed: int, rank: int = 4, scale: float = 0.5, d_out: int = 12, d_in: int = 10) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g), scale)


def update(seed: int, factor: float = 1.0, loss: float = 0.5) -> ClientUpdate:
    layers = {n: lowrank(seed * 10 + i) for i, n in enumerate(("q", "v"))}
    return ClientUpdate({n: LowRank(f.B * factor, f.A, f.scale) for n, f in layers.items()}, {}, loss)


def test_the_update_norm_is_the_dense_updates_without_forming_it():
    u = update(3, factor=2.5)
    dense = torch.sqrt(sum((f.delta().double() ** 2).sum() for f in u.factors.values()))
    assert update_norm(u.factors) == pytest.approx(float(dense), rel=1e-6)  # float32 factors


def test_an_outlier_client_at_100x_moves_glora_by_at_most_twice_the_clean_norm_when_clipped():
    clean = [update(i) for i in range(5)]
    weights = [1.0] * 6
    rule = get_rule("glora", rank="sum")  # the exact weighted mean: what the outlier moves

    def aggregate(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        layers = rule.aggregate_layers({n: [u.factors[n] for u in updates] for n in ("q", "v")}, weights)
        return {n: s.delta() for n, s in layers.items()}

    def norm(deltas: dict[str, torch.Tensor]) -> float:
        return float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())))

    base = aggregate([*clean, update(0)])  # the sixth client honest: the clean aggregate
    attacked = aggregate([*clean, update(0, factor=100.0)])
    moved = norm({n: attacked[n] - base[n] for n in base})
    assert moved > 10 * norm(base)  # unclipped, the outlier dominates
    outlier = update(0, factor=100.0)
    clip_updates([*[update(i) for i in range(5)], outlier], 2.0, frozenset({"A", "B"}))
    clipped = aggregate([*clean, outlier])
    assert norm({n: clipped[n] - base[n] for n in base}) <= 2 * norm(base)


def test_clipping_scales_only_a_factor_the_client_trained_and_sent():
    outlier = update(1, factor=50.0)
    frozen_b = {n: f.B.clone() for n, f in outlier.factors.items()}
    norms = clip_updates([update(0), update(2), outlier], 1.0, frozenset({"A"}))
    assert norms[2] > norms[0]
    assert all(torch.equal(outlier.factors[n].B, frozen_b[n]) for n in frozen_b)  # B was frozen: A scaled
    assert update_norm(outlier.factors) == pytest.approx(float(np.median(norms)), rel=1e-6)


def test_a_nan_update_is_left_out_naming_client_and_layer_and_abort_or_too_many_stop():
    bad = update(1)
    bad.factors["v"] = LowRank(bad.factors["v"].B * float("nan"), bad.factors["v"].A, 0.5)
    args = (3, 3, [0, 4, 7], [update(0), bad, update(2)], [1.0, 1.0, 1.0])
    settled = settle_round(*args, {}, "skip", 0.5, None, frozenset({"A", "B"}))
    assert settled.clients == [0, 7] and settled.left_out == {4: "layer v: factor B contains NaN or Inf"}
    with pytest.raises(ValueError, match=r"round 3: client 4: layer v: factor B contains NaN or Inf \(on-client-error"):
        settle_round(*args, {}, "abort", 0.5, None, frozenset({"A", "B"}))
    with pytest.raises(ValueError, match=r"round 3: 2 of 3 clients failed, more than max-failed-fraction 0.5"):
        settle_round(*args, {7: "its training raised RuntimeError: boom"}, "skip", 0.5, None, frozenset({"A", "B"}))
    diverged = update(2, loss=float("nan"))
    left = settle_round(3, 2, [0, 1], [update(0), diverged], [1.0, 1.0], {}, "skip", 0.5, None, frozenset()).left_out
    assert left == {1: "its training loss is nan (training diverged)"}


def test_a_diverging_client_is_skipped_and_the_run_finishes_its_rounds(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)
    real = client_module.train_client

    def diverge_client_1(model, task, cfg, rule, server_round, client, *args, **kwargs):
        out = real(model, task, cfg, rule, server_round, client, *args, **kwargs)
        if client == 1:
            out.factors = {n: LowRank(f.B * float("inf"), f.A, f.scale) for n, f in out.factors.items()}
        return out

    monkeypatch.setattr("glora.federation.simulation.train_client", diverge_client_1)
    cfg = RunConfig.for_task("toy", clients=3, ranks="2", rounds=2, local_steps=1, batch_size=8, threads=1)
    summary = run_federation(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and [r["clients"] for r in rows] == [[0, 2], [0, 2]]
    assert all(set(r["left_out"]) == {"1"} and "contains NaN or Inf" in r["left_out"]["1"] for r in rows)
    assert summary["left_out"] == {"1": [1], "2": [1]}
    with pytest.raises(ValueError, match=r"round 1: client 1: layer .* contains NaN or Inf"):
        run_federation(cfg.replace(on_client_error="abort"), tmp_path / "abort", progress=False)


def test_a_client_whose_training_raises_is_left_out_with_the_error(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.FAMILIES, "toy", ToyTask)
    real = client_module.train_client

    def raise_for_client_0(model, task, cfg, rule, server_round, client, *args, **kwargs):
        if client == 0:
            raise RuntimeError("CUDA out of memory")
        return real(model, task, cfg, rule, server_round, client, *args, **kwargs)

    monkeypatch.setattr("glora.federation.simulation.train_client", raise_for_client_0)
    cfg = RunConfig.for_task("toy", clients=3, ranks="2", rounds=1, local_steps=1, batch_size=8, threads=1)
    run_federation(cfg, tmp_path / "run", progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["left_out"] == {"0": "its training raised RuntimeError: CUDA out of memory"}
    with pytest.raises(ValueError, match="3 of 3 clients failed"):
        monkeypatch.setattr(
            "glora.federation.simulation.train_client", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))
        )
        run_federation(cfg, tmp_path / "all", progress=False)


def test_failure_policy_options_are_checked_up_front():
    from glora.federation.checks import check_config

    for change, words in (
        ({"on_client_error": "ignore"}, "--on-client-error must be 'skip' or 'abort'"),
        ({"max_failed_fraction": 1.5}, r"--max-failed-fraction must be in \[0, 1\]"),
        ({"clip_update_norm": 0.5}, "--clip-update-norm must be a finite number >= 1"),
        ({"partition_scheme": "one-pass", "alpha": None}, "with --alpha iid there is none"),
        ({"partition_scheme": "tree"}, "--partition-scheme 'tree': choose resample or one-pass"),
        ({"data_source": "bogus"}, "--data-source must be 'local' or 'hub'"),
        ({"task": "superni", "data_source": "hub"}, "--data-source hub applies to GLUE tasks"),
    ):
        with pytest.raises(ValueError, match=words):
            check_config(RunConfig.from_dict(change))  # with the task's defaults


def test_a_node_reporting_a_false_example_count_is_left_out(task_identity, caplog):
    import logging

    from flwr.app import ArrayRecord

    from tests.test_flower import FakeGrid, initial_head, make_strategy

    strategy = make_strategy("glora", [2, 4, 4], sizes=[30, 50, 20])
    ids = [n.node_id for n in strategy.nodes]
    grid = FakeGrid(ids, {ids[0]: 30, ids[1]: 50, ids[2]: 10**9})  # node 2 claims a billion examples
    with caplog.at_level(logging.WARNING, logger="flwr.glora"):
        strategy.start(grid, ArrayRecord(initial_head()), num_rounds=1)
    assert "left out client 2 (node 102): example count 1000000000 differs from its partition's 20" in caplog.text
    assert strategy.last_record["clients"] == [0, 1]


def test_a_node_sending_a_1000x_update_cannot_move_the_global_model_beyond_the_clipping_bound(task_identity):
    """With --clip-update-norm c every update the round keeps has norm <= c x the median
    client norm, so the global update (a weighted mean of them, exact at GLoRA's default
    rank) cannot be longer than that bound, whatever one node sends; unclipped, a node that
    sends 1,000x its update drags the global update far beyond it."""
    from flwr.app import ArrayRecord

    from glora.federation.robust import clip_bound
    from tests.test_flower import FakeGrid, initial_head, make_strategy

    def global_norm(clip):
        strategy = make_strategy("glora", [2, 2, 4, 4, 4], sizes=[30] * 5, clip_update_norm=clip)
        ids = [n.node_id for n in strategy.nodes]
        grid = FakeGrid(ids, dict.fromkeys(ids, 30), faults={(1, ids[4]): "x1000"})
        strategy.start(grid, ArrayRecord(initial_head()), num_rounds=1)
        sent = [grid.trained[(1, i)][0] for i in ids[:4]]
        norms = [update_norm(f) for f in sent] + [1000 * update_norm(grid.trained[(1, ids[4])][0])]
        delta = {n: s.delta() for n, s in strategy.state.layers.items()}
        return math.sqrt(sum(float(d.double().norm()) ** 2 for d in delta.values())), clip_bound(norms, 2.0)

    clipped, bound = global_norm(2.0)
    assert clipped <= bound * (1 + 1e-5)
    unclipped, _ = global_norm(None)
    assert unclipped > 50 * bound


def test_a_restarted_node_with_a_new_id_takes_its_partition_back(task_identity, caplog):
    import logging

    from flwr.app import ArrayRecord

    from tests.test_flower import FakeGrid, initial_head, make_strategy

    strategy = make_strategy("glora", [2, 2, 2])
    ids = [n.node_id for n in strategy.nodes]
    grid = FakeGrid(ids, {ids[0]: 30, ids[1]: 50, ids[2]: 20})
    rounds = []

    def after_round(t, _):
        rounds.append(strategy.last_record)
        if t == 1:  # node 101 (partition 1) restarts: it reconnects as node 201
            grid.node_ids[1] = 201
            grid.examples[201] = 50

    with caplog.at_level(logging.INFO, logger="flwr.glora"):
        strategy.start(grid, ArrayRecord(initial_head()), num_rounds=2, evaluate_fn=after_round)
    assert "partition 1: node 201 takes over from node 101 (gone)" in caplog.text
    assert [r["clients"] for r in rounds[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert strategy.nodes[1].node_id == 201 and (2, 201) in grid.trained


def test_gradients_a_failed_client_left_do_not_reach_the_next_one():
    from types import SimpleNamespace

    from torch import nn

    from glora.federation.client import local_train

    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(3, 2)

        def forward(self, x, labels):
            return SimpleNamespace(loss=nn.functional.cross_entropy(self.w(x), labels))

    def trained(dirty: bool) -> torch.Tensor:
        torch.manual_seed(1)
        model = Tiny()
        if dirty:  # what a client that raised after its backward leaves on the shared adapter
            model.w.weight.grad = torch.full_like(model.w.weight, 100.0)
        batch = lambda idx: {"x": x[idx], "labels": y[idx]}  # noqa: E731
        local_train(model, [model.w.weight], [], batch, np.arange(8), 2, 4, 0.1, 0.1, 0.0, seed=0)
        return model.w.weight.detach().clone()

    assert torch.equal(trained(dirty=True), trained(dirty=False))
