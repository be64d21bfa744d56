"""GLoRA's properties (method.md), each checked on data where it could fail."""

import pytest
import torch

from glora import LowRank, get_rule

from .conftest import make_updates, random_gauges, rel_err, weighted_mean


@pytest.mark.parametrize("options", [{}, {"sides": 2}, {"consensus": "energy"}, {"rank": 5}])
def test_gauge_invariance_glora_holds_and_fedit_fails(options):
    ups = make_updates([3, 3, 3, 3], d_out=41, d_in=19)
    w = [1.0, 2.0, 3.0, 4.0]
    moved = random_gauges(ups)
    glora = get_rule("glora", **options)
    assert rel_err(glora.aggregate(moved, w).delta(), glora.aggregate(ups, w).delta()) < 1e-9
    fedit = get_rule("fedit")
    assert rel_err(fedit.aggregate(moved, w).delta(), fedit.aggregate(ups, w).delta()) > 0.1


def test_gauge_invariance_with_unequal_ranks(unequal):
    ups, w = unequal
    for opts in ({}, {"sides": 2}, {"rank": 6, "consensus": "energy"}):
        rule = get_rule("glora", **opts)
        assert rel_err(rule.aggregate(random_gauges(ups), w).delta(), rule.aggregate(ups, w).delta()) < 1e-9


@pytest.mark.parametrize("sides", [1, 2])
def test_exact_weighted_mean_when_server_rank_covers_all_clients(unequal, sides):
    ups, w = unequal
    state = get_rule("glora", rank=sum(u.rank for u in ups), sides=sides).aggregate(ups, w)
    assert rel_err(state.delta(), weighted_mean(ups, w)) < 1e-12


def test_max_rank_projects_the_mean_onto_the_consensus_subspace(unequal):
    ups, w = unequal
    state = get_rule("glora", rank="max").aggregate(ups, w)  # R = largest client rank = 8 < 17
    mean = weighted_mean(ups, w)
    U = state.Ub
    assert U.shape[1] == 8
    assert rel_err(state.delta(), U @ U.T @ mean) < 1e-12
    assert rel_err(state.delta(), mean) > 1e-3  # a real projection, not the mean


def test_default_rank_is_the_sum_of_client_ranks_capped_at_64(unequal):
    """The replay's pre-registered choice: with few clients the exact mean, with many the top
    consensus directions of it, at most 64."""
    ups, w = unequal  # ranks 2, 4, 8, 3: sum 17
    assert rel_err(get_rule("glora").aggregate(ups, w).delta(), weighted_mean(ups, w)) < 1e-12
    capped = get_rule("glora", rank="sum<=10").aggregate(ups, w)
    assert capped.Ub.shape[1] == 10
    assert get_rule("glora", rank="2max").aggregate(ups, w).Ub.shape[1] == 16
    for bad in ("sum<=0", "sum<=x", "most", 0):
        with pytest.raises(ValueError, match="glora: rank"):
            get_rule("glora", rank=bad)


def test_projector_consensus_prefers_shared_directions_over_energy():
    # Three clients share direction e0 with small magnitude; one client has a huge private direction e1.
    d_out, d_in = 20, 15
    e = torch.eye(d_out, dtype=torch.float64)
    f = torch.eye(d_in, dtype=torch.float64)
    shared = [LowRank(0.1 * e[:, :1], f[:1], 1.0) for _ in range(3)]
    loud = LowRank(100.0 * e[:, 1:2], f[1:2], 1.0)
    ups, w = [*shared, loud], [1.0, 1.0, 1.0, 1.0]
    proj = get_rule("glora", rank=1).aggregate(ups, w)
    energy = get_rule("glora", rank=1, consensus="energy").aggregate(ups, w)
    assert abs(float(proj.Ub[0, 0])) == pytest.approx(1.0)
    assert abs(float(energy.Ub[1, 0])) == pytest.approx(1.0)


def test_threshold_keeps_directions_with_enough_agreement():
    d_out, d_in = 20, 15
    e, f = torch.eye(d_out, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64)
    # Direction 0 in all 4 clients (eigenvalue 1), direction 1 in one client (0.25), 2 in three (0.75).
    ups = [
        LowRank(e[:, [0, 1, 2]], f[[0, 1, 2]], 1.0),
        LowRank(e[:, [0, 2]], f[[0, 2]], 1.0),
        LowRank(e[:, [0, 2]], f[[0, 2]], 1.0),
        LowRank(e[:, [0]], f[[0]], 1.0),
    ]
    w = [1.0] * 4
    assert get_rule("glora", rank=3, threshold=0.5).aggregate(ups, w).rank == 2
    assert get_rule("glora", rank=3, threshold=0.2).aggregate(ups, w).rank == 3
    assert get_rule("glora", rank=1, threshold=0.2).aggregate(ups, w).rank == 1  # the cap


@pytest.mark.parametrize("gauge", ["balanced", "a-normal"])
@pytest.mark.parametrize("sides", [1, 2])
def test_readout_is_the_truncated_svd_and_nested(unequal, gauge, sides):
    ups, w = unequal
    state = get_rule("glora", rank=10, readout_gauge=gauge, sides=sides).aggregate(ups, w)
    D = state.delta().double()
    U, S, Vh = torch.linalg.svd(D)
    prev = None
    for r in (1, 2, 4, 7):
        for scale in (0.5, 2.0, 16.0):
            out = state.readout(rank=r, scale=scale)
            assert out.B.shape == (D.shape[0], r) and out.A.shape == (r, D.shape[1])
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            assert rel_err(out.delta(), best) < 1e-10
        if prev is not None:
            # nested: the rank-r' readout's first r columns/rows equal the rank-r readout (same scale)
            assert torch.allclose(out.B[:, : prev.rank], prev.B, atol=1e-12)
            assert torch.allclose(out.A[: prev.rank], prev.A, atol=1e-12)
        prev = out


def test_a_normal_gauge_keeps_rows_of_A_at_lora_init_norm(unequal):
    ups, w = unequal
    out = get_rule("glora", readout_gauge="a-normal").aggregate(ups, w).readout(4, 2.0)
    assert torch.allclose(out.A.norm(dim=1), torch.full((4,), 3**-0.5, dtype=torch.float64))
    assert torch.allclose(out.A @ out.A.T, torch.eye(4, dtype=torch.float64) / 3)


def test_round_zero_gives_zero_state_with_trainable_readout():
    ups = [
        LowRank(torch.zeros(30, r, dtype=torch.float64), torch.randn(r, 20, dtype=torch.float64), 2.0) for r in (2, 4)
    ]
    state = get_rule("glora").aggregate(ups, [1.0, 1.0])
    assert state.rank == 0
    assert torch.count_nonzero(state.delta()) == 0
    out = state.readout(rank=4, scale=2.0)
    assert torch.count_nonzero(out.B) == 0
    assert float(out.A.norm()) > 0.5  # a fresh LoRA init, not zero
    assert torch.count_nonzero(out.delta()) == 0


def test_rank_deficient_state_pads_readout_without_changing_the_update(unequal):
    ups, w = unequal
    state = get_rule("glora", rank=3).aggregate(ups, w)
    out = state.readout(rank=6, scale=2.0)
    assert rel_err(out.delta(), state.delta()) < 1e-12
    assert torch.count_nonzero(out.B[:, 3:]) == 0
    assert bool((out.A[3:].norm(dim=1) > 0.1).all())


def test_server_dtype_and_client_dtype():
    ups = make_updates([4, 8], dtype=torch.float32)
    for dtype in (torch.float64, torch.float32):
        state = get_rule("glora", dtype=dtype).aggregate(ups, [1.0, 1.0])
        assert state.Ub.dtype == dtype
        assert state.readout(4, 2.0).B.dtype == torch.float32
        assert state.delta().dtype == torch.float32


def test_float32_server_math_agrees_with_float64(unequal):
    ups, w = unequal
    d64 = get_rule("glora", dtype=torch.float64).aggregate(ups, w).delta()
    d32 = get_rule("glora", dtype=torch.float32).aggregate(ups, w).delta()
    # float32 carries ~7 digits; QR/SVD of well-conditioned small matrices lose at most ~2 of them.
    assert rel_err(d32, d64) < 1e-5


def test_memory_blends_previous_subspace(unequal):
    ups, w = unequal
    rule = get_rule("glora", rank=4, memory=0.5)
    first = rule.aggregate(ups, w)
    fresh = get_rule("glora", rank=4).aggregate(ups[::-1][:2], w[:2])
    blended = rule.aggregate(ups[::-1][:2], w[:2], previous=first)
    assert rel_err(blended.delta(), fresh.delta()) > 1e-3


def test_restart_merges_the_update_and_hands_out_a_fresh_adapter(unequal):
    ups, w = unequal
    rule = get_rule("glora", restart=True)
    state = rule.aggregate(ups, w)
    ref = get_rule("glora").aggregate(ups, w)
    assert rel_err(state.merge().delta(), ref.delta()) < 1e-12
    assert rel_err(state.delta(), ref.delta()) < 1e-12
    out = state.readout(4, 2.0)
    assert torch.count_nonzero(out.B) == 0


@pytest.mark.parametrize("batched", [False, True])
def test_keep_tail_leaves_a_state_its_clients_did_not_move_unchanged(batched, monkeypatch):
    """Clients of ranks 2/4/8/16 that hand back exactly the readout they received (no local
    progress): with keep_tail the round returns the previous state; as published, it keeps
    only sum_i w_i trunc_{r_i}(state), so the directions beyond rank 2 shrink."""
    ranks, w = [2, 4, 8, 16], [3.0, 1.0, 2.0, 4.0]
    start = get_rule("glora", rank="max").aggregate(make_updates(ranks, d_out=96, d_in=80), w)
    assert start.rank == 16
    scale = 2.0
    received = [start.readout(r, scale) for r in ranks]
    weights = torch.tensor(w, dtype=torch.float64) / sum(w)
    truncated_mean = sum(wi * start.truncated(r, scale).delta() for wi, r in zip(weights, ranks, strict=True))
    for keep_tail, expected in ((True, start.delta()), (False, truncated_mean)):
        rule = get_rule("glora", rank="max", keep_tail=keep_tail)
        if batched:  # the route a whole model takes; it must not fall back to layer by layer
            monkeypatch.setattr(rule, "aggregate", lambda *a, **k: pytest.fail("not batched"))
            state = rule.aggregate_layers({"q": received}, w, previous={"q": start})["q"]
        else:
            state = rule.aggregate(received, w, previous=start)
        assert rel_err(state.delta(), expected) < 1e-9
    assert rel_err(truncated_mean, start.delta()) > 0.05  # the published rule really loses the tail


def test_tail_completes_the_truncated_readout(unequal):
    ups, w = unequal
    state = get_rule("glora").aggregate(ups, w)
    for r in (1, 3, state.rank):
        tail = state.tail(r, 0.5)
        whole = state.truncated(r, 0.5).delta() + (0 if tail is None else tail.delta())
        assert rel_err(whole, state.delta()) < 1e-12
    assert state.tail(state.rank, 0.5) is None


def test_keep_tail_refuses_merge_and_restart():
    with pytest.raises(ValueError, match="keep_tail needs warm start"):
        get_rule("glora", keep_tail=True, restart=True)
