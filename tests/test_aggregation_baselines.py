"""The baselines' defining properties (issue 3), each on data where it could fail:
non-square layers, unequal weights, and, where a rule allows it, unequal ranks and scales."""

import resource

import pytest
import torch

from glora import RULES, LowRank, get_rule
from glora.aggregation.base import FACTORS
from glora.aggregation.florist import energy_rank
from glora.aggregation.hetlora import update_norms
from glora.experiments.gauges import UNEQUAL_RANKS, gauge_table

from .conftest import make_updates, rel_err, weighted_mean


def with_scales(updates, scales):
    """The same factors with other LoRA scales (as lora_alpha / r gives for unequal ranks)."""
    return [LowRank(u.B, u.A, s) for u, s in zip(updates, scales, strict=True)]


def normalized(w):
    w = torch.tensor(w, dtype=torch.float64)
    return w / w.sum()


# fedit


def test_fedit_averages_each_factor_and_misses_the_mean_update(equal):
    ups, w = equal
    state = get_rule("fedit").aggregate(ups, w)
    p = normalized(w)
    assert torch.allclose(state.adapter.B, sum(pi * u.B for pi, u in zip(p, ups, strict=True)), atol=1e-14)
    assert torch.allclose(state.adapter.A, sum(pi * u.A for pi, u in zip(p, ups, strict=True)), atol=1e-14)
    assert rel_err(state.delta(), weighted_mean(ups, w)) > 0.1


# ffa-lora


def test_ffa_lora_trains_and_sends_B_only():
    plan = get_rule("ffa-lora").client_plan(3)
    assert plan.train == {"B"} and plan.send == {"B"} and plan.share_head


def test_ffa_lora_is_exact_with_a_shared_A_even_for_different_scales():
    ups = with_scales(make_updates([4, 4, 4], shared_A=True), [1.0, 2.0, 4.0])
    w = [10.0, 30.0, 60.0]
    state = get_rule("ffa-lora").aggregate(ups, w)
    assert rel_err(state.delta(), weighted_mean(ups, w)) < 1e-14
    out = state.readout(4, 2.0)
    assert torch.equal(out.A, ups[0].A)  # A stays the shared initialisation
    assert rel_err(out.delta(), weighted_mean(ups, w)) < 1e-14


def test_ffa_lora_refuses_clients_whose_A_moved():
    ups = make_updates([4, 4, 4], shared_A=True)
    ups[2] = LowRank(ups[2].B, ups[2].A + 1e-3, ups[2].scale)
    with pytest.raises(ValueError, match="rule 'ffa-lora': client 2's A differs from client 0's"):
        get_rule("ffa-lora").aggregate(ups, [1.0, 1.0, 1.0])


# flora


def test_flora_is_exact_for_unequal_ranks_and_scales_and_stacks_every_rank(unequal):
    ups, w = unequal
    ups = with_scales(ups, [16.0 / u.rank for u in ups])  # lora_alpha / r: a different scale per client
    state = get_rule("flora").aggregate(ups, w)
    mean = weighted_mean(ups, w)
    assert state.merge().rank == sum(u.rank for u in ups) == 17
    assert rel_err(state.merge().delta(), mean) < 1e-14
    assert rel_err(state.delta(), mean) < 1e-14


def test_flora_hands_out_a_fresh_adapter_that_changes_every_round(unequal):
    ups, w = unequal
    rule = get_rule("flora")
    first = rule.aggregate(ups, w)
    second = rule.aggregate(ups, w, previous=first)
    a, b = first.readout(4, 2.0), second.readout(4, 2.0)
    assert torch.count_nonzero(a.B) == 0 and bool((a.A.norm(dim=1) > 0.1).all())
    assert not torch.equal(a.A, b.A)  # a new random initialisation each round


# flexlora


def test_flexlora_readout_is_the_truncated_svd_of_the_dense_scaled_mean(unequal):
    ups, w = unequal
    ups = with_scales(ups, [16.0 / u.rank for u in ups])
    state = get_rule("flexlora").aggregate(ups, w)
    mean = weighted_mean(ups, w)
    U, S, Vh = torch.linalg.svd(mean)
    assert rel_err(state.delta(), mean) < 1e-13
    for r in (1, 3, 6):
        for scale in (0.5, 4.0):
            out = state.readout(r, scale)
            assert rel_err(out.delta(), (U[:, :r] * S[:r]) @ Vh[:r]) < 1e-12
            # the reference code's convention: A = V_r^T (orthonormal rows), B = U_r S_r / s
            assert torch.allclose(out.A @ out.A.T, torch.eye(r, dtype=torch.float64), atol=1e-12)
            assert torch.allclose(out.B.norm(dim=0) * scale, S[:r], rtol=1e-12)


# hetlora


def hetlora_example():
    """Ranks 2, 4, 8 on a 10 x 9 layer: B_k = the first r_k unit columns, A_k = diag(a_k) on
    the first r_k unit rows, so ||B_k A_k||_F = ||a_k|| = 5, 2, 4."""
    a = [torch.tensor([3.0, 4.0]), torch.ones(4), torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1])]
    eye_out, eye_in = torch.eye(10, dtype=torch.float64), torch.eye(9, dtype=torch.float64)
    return [LowRank(eye_out[:, : len(ak)], ak.double()[:, None] * eye_in[: len(ak)], 1.0) for ak in a]


def test_hetlora_pads_and_weights_by_update_norm_as_computed_by_hand():
    ups = hetlora_example()
    rule = get_rule("hetlora", data_weighted=False)
    # Norm weights alone (the paper's Figure 2): these example counts must not matter.
    state = rule.aggregate(ups, [100.0, 1.0, 7.0])
    assert torch.allclose(
        rule.aggregation_weights(ups, normalized([100.0, 1.0, 7.0])),
        torch.tensor([5 / 11, 2 / 11, 4 / 11], dtype=torch.float64),
    )
    # Column j of B holds the weights of the clients whose rank exceeds j.
    col = torch.tensor([1, 1, 6 / 11, 6 / 11, 4 / 11, 4 / 11, 4 / 11, 4 / 11], dtype=torch.float64)
    # Row j of A: sum_k p_k a_k[j] over those clients, e.g. row 0 = (5*3 + 2*1 + 4*3) / 11.
    row = torch.tensor([29, 26, 6, 6, 4, 4, 4, 4], dtype=torch.float64) / 11
    assert torch.allclose(state.adapter.B, torch.eye(10, 8, dtype=torch.float64) * col, atol=1e-15)
    assert torch.allclose(state.adapter.A, row[:, None] * torch.eye(8, 9, dtype=torch.float64), atol=1e-15)
    for r in (2, 4, 8):
        out = state.readout(r, 2.0)
        assert torch.allclose(out.B, state.adapter.B[:, :r] / 2.0, atol=1e-15)  # the leading r columns
        assert torch.equal(out.A, state.adapter.A[:r])  # and rows


def test_hetlora_norms_come_from_gram_matrices_and_fold_in_the_scale(unequal):
    ups, _ = unequal
    ups = with_scales(ups, [16.0 / u.rank for u in ups])
    dense = torch.stack([u.delta().norm() for u in ups])
    assert torch.allclose(update_norms(ups), dense, rtol=1e-12)


def test_hetlora_data_weighted_option_multiplies_in_example_counts():
    ups = hetlora_example()
    p = get_rule("hetlora", data_weighted=True).aggregation_weights(ups, normalized([1.0, 5.0, 2.0]))
    assert torch.allclose(p, torch.tensor([5.0, 10.0, 8.0], dtype=torch.float64) / 23)


def test_hetlora_self_pruning_is_a_client_step_that_leaves_the_server_step_alone():
    # Self-pruning (tests/test_hetlora_pruning.py) changes what clients upload, not how the server
    # aggregates it: a rule with pruning on aggregates the same uploads to the same state.
    ups = hetlora_example()
    plain = get_rule("hetlora").aggregate(ups, [1.0, 2.0, 3.0])
    pruning = get_rule("hetlora", prune_gamma=0.01, prune_ratio=0.75).aggregate(ups, [1.0, 2.0, 3.0])
    assert torch.equal(plain.adapter.B, pruning.adapter.B) and torch.equal(plain.adapter.A, pruning.adapter.A)


# fedex-lora


def test_fedex_lora_residual_plus_adapter_is_the_exact_mean_on_a_non_square_layer():
    ups = with_scales(make_updates([4, 4, 4], d_out=37, d_in=23), [2.0, 2.0, 3.0])
    w = [10.0, 30.0, 60.0]
    state = get_rule("fedex-lora").aggregate(ups, w)
    residual = state.merge()
    # (d_out, d_in), the shape of the weight it is added to; the reference code's (d_in, d_out) fails here
    assert residual.shape == (37, 23)
    out = state.readout(4, 2.0)
    assert rel_err(residual + out.delta(), weighted_mean(ups, w)) < 1e-13
    # the adapter continues from FedIT's averaged factors
    fedit = get_rule("fedit").aggregate(ups, w).readout(4, 2.0)
    assert torch.allclose(out.B, fedit.B, atol=1e-14) and torch.allclose(out.A, fedit.A, atol=1e-14)


# fedsa-lora


def test_fedsa_lora_averages_A_only_and_leaves_each_clients_B_alone(equal):
    ups, w = equal
    rule = get_rule("fedsa-lora")
    plan = rule.client_plan(2)
    # B never leaves the client and is never replaced by the server's: it stays the client's own.
    assert plan.send == {"A"} and plan.personal == {"B"} and not plan.share_head
    assert plan.train == {"A", "B"}
    state = rule.aggregate(ups, w)
    mean_A = sum(pi * u.A for pi, u in zip(normalized(w), ups, strict=True))
    assert torch.allclose(state.readout(4, 2.0).A, mean_A, atol=1e-14)
    # The shared A depends on the A's alone: other B's on the clients leave it unchanged.
    others = [LowRank(3.0 * u.B.flip(0), u.A, u.scale) for u in ups]
    assert torch.equal(rule.aggregate(others, w).readout(4, 2.0).A, state.readout(4, 2.0).A)


# rolora


def test_rolora_alternates_B_and_A_rounds():
    rule = get_rule("rolora")
    assert [set(rule.client_plan(t).train) for t in (1, 2, 3, 4)] == [{"B"}, {"A"}, {"B"}, {"A"}]
    assert all(rule.client_plan(t).send == rule.client_plan(t).train for t in (1, 2))


def test_rolora_B_round_keeps_A_and_is_exact():
    ups = make_updates([4, 4, 4], shared_A=True)
    w = [10.0, 30.0, 60.0]
    state = get_rule("rolora").aggregate(ups, w)
    assert torch.equal(state.adapter.A, ups[0].A)
    assert rel_err(state.delta(), weighted_mean(ups, w)) < 1e-14


def test_rolora_A_round_keeps_B_and_is_exact():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(37, 4, generator=g, dtype=torch.float64)
    ups = [LowRank(B.clone(), torch.randn(4, 23, generator=g, dtype=torch.float64), 2.0) for _ in range(3)]
    w = [10.0, 30.0, 60.0]
    state = get_rule("rolora").aggregate(ups, w)
    assert torch.equal(state.adapter.B, B)
    assert rel_err(state.delta(), weighted_mean(ups, w)) < 1e-14


def test_rolora_refuses_rounds_where_both_factors_moved(equal):
    ups, w = equal
    with pytest.raises(ValueError, match="rule 'rolora': the clients' B and A both differ"):
        get_rule("rolora").aggregate(ups, w)


# florist


def test_florist_with_full_threshold_is_the_exact_mean_and_restarts(unequal):
    ups, w = unequal
    ups = with_scales(ups, [16.0 / u.rank for u in ups])
    state = get_rule("florist", threshold=1.0).aggregate(ups, w)
    mean = weighted_mean(ups, w)
    assert state.rank == 17
    assert rel_err(state.delta(), mean) < 1e-12
    assert rel_err(state.merge().delta(), mean) < 1e-12
    assert torch.count_nonzero(state.readout(4, 2.0).B) == 0  # a fresh adapter


@pytest.mark.parametrize("threshold", [0.9, 0.5])
def test_florist_keeps_the_smallest_rank_holding_the_threshold_energy(unequal, threshold):
    ups, w = unequal
    state = get_rule("florist", threshold=threshold).aggregate(ups, w)
    S = torch.linalg.svdvals(weighted_mean(ups, w))[:17]
    e = S**2
    frac = torch.cumsum(e, 0) / e.sum()
    p = int((frac < threshold).sum()) + 1  # first index where the kept fraction reaches the threshold
    assert state.rank == p < 17
    assert torch.allclose(state.lam, S[:p], rtol=1e-10)
    U, _, Vh = torch.linalg.svd(weighted_mean(ups, w))
    assert rel_err(state.delta(), (U[:, :p] * S[:p]) @ Vh[:p]) < 1e-10


def authors_kept_rank(sig, threshold):
    """The kept rank as the authors' code computes it (github.com/Anonymous-user-00/FLoRIST,
    fed_utils/model_aggregation.py): the first index where the cumulative energy of the
    squared singular values reaches the threshold, plus one."""
    cumulative_energy = torch.cumsum(sig**2, dim=0) / torch.sum(sig**2)
    return int((cumulative_energy >= threshold).nonzero().min()) + 1


@pytest.mark.parametrize(("threshold", "by_sigma_squared", "by_sigma"), [(0.75, 2, 3), (0.88, 3, 4)])
def test_florist_kept_rank_follows_the_energy_of_squared_singular_values(threshold, by_sigma_squared, by_sigma):
    # Two clients (ranks 2 and 3, unequal weights and scales) whose weighted mean update is
    # U diag(4, 3, 2, 1.5, 1) V^T on a non-square layer. Kept fractions of sum sig^2:
    # 0.50, 0.78, 0.90, 0.97, 1; of sum sig: 0.35, 0.61, 0.78, 0.91, 1. The two definitions of
    # energy keep different ranks at these thresholds; the paper's code uses sig^2.
    g = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(37, 5, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(23, 5, generator=g, dtype=torch.float64))
    sig = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    w, s = [0.25, 0.75], [2.0, 4.0]
    ups = [
        LowRank(U[:, :2], (sig[:2, None] * V[:, :2].T) / (w[0] * s[0]), s[0]),
        LowRank(U[:, 2:], (sig[2:, None] * V[:, 2:].T) / (w[1] * s[1]), s[1]),
    ]
    assert rel_err(weighted_mean(ups, w), (U * sig) @ V.T) < 1e-14
    linear = int((torch.cumsum(sig, 0) / sig.sum() < threshold).sum()) + 1
    assert (authors_kept_rank(sig, threshold), linear) == (by_sigma_squared, by_sigma)
    state = get_rule("florist", threshold=threshold).aggregate(ups, w)
    assert state.rank == energy_rank(sig, threshold) == by_sigma_squared
    assert torch.allclose(state.lam, sig[:by_sigma_squared], rtol=1e-12)
    # What every client merges before restarting from a fresh adapter: the kept components.
    kept = (U[:, :by_sigma_squared] * sig[:by_sigma_squared]) @ V[:, :by_sigma_squared].T
    assert rel_err(state.merge().delta(), kept) < 1e-12
    assert torch.count_nonzero(state.readout(4, 2.0).B) == 0


def test_florist_defaults_to_the_authors_threshold_and_has_no_other_energy():
    assert get_rule("florist").threshold == 0.9
    with pytest.raises(ValueError, match="rule 'florist': unknown option 'energy'"):
        get_rule("florist", energy="linear")


def test_energy_rank_edge_cases():
    sig = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # energies 9, 4, 1 of 14
    assert energy_rank(sig, 9 / 14) == 1
    assert energy_rank(sig, 9 / 14 + 1e-9) == 2
    assert energy_rank(sig, 1.0) == 3
    assert energy_rank(torch.zeros(3, dtype=torch.float64), 0.9) == 0


# every rule


def round_zero_updates(rule, ranks):
    """Untrained clients (B = 0) holding their initial A: shared if the rule freezes A."""
    g = torch.Generator().manual_seed(5)
    A0 = torch.randn(ranks[0], 23, generator=g, dtype=torch.float64) / 23**0.5
    shared = "A" not in rule.client_plan(1).train
    return [
        LowRank(
            torch.zeros(37, r, dtype=torch.float64),
            A0.clone() if shared else torch.randn(r, 23, generator=g, dtype=torch.float64) / 23**0.5,
            2.0,
        )
        for r in ranks
    ]


@pytest.mark.parametrize("name", sorted(RULES))
def test_round_zero_gives_a_readout_that_can_train(name):
    rule = get_rule(name)
    # A pooled rule (the centralized reference) sees one client holding everyone's data.
    ranks = [8] if rule.pooled else [4, 4, 4] if not rule.accepts_unequal_ranks else [2, 4, 8]
    state = rule.aggregate(round_zero_updates(rule, ranks), [1.0, 2.0, 3.0][: len(ranks)])
    assert torch.count_nonzero(state.delta()) == 0
    merged = state.merged_delta()
    assert merged is None or torch.count_nonzero(merged) == 0
    for r in sorted(set(ranks)):
        out = state.readout(r, 2.0)
        assert out.B.shape == (37, r) and out.A.shape == (r, 23)
        # Every row of A non-zero: B's gradient is proportional to A, so every column of B can move.
        assert bool((out.A.norm(dim=1) > 1e-3).all())


@pytest.mark.parametrize("name", sorted(RULES))
def test_float32_clients_get_float32_adapters_and_merges(name):
    # Models train in float32: whatever the server computes in, what goes back must match.
    rule = get_rule(name)
    shared_A = "A" not in rule.client_plan(1).train
    ups = make_updates([4, 4, 4], dtype=torch.float32, shared_A=shared_A)
    state = rule.aggregate(ups, [1.0, 2.0, 3.0])
    assert state.readout(4, 2.0).B.dtype == state.readout(4, 2.0).A.dtype == torch.float32
    merged = state.merged_delta()
    assert merged is None or merged.dtype == torch.float32
    assert state.delta().dtype == torch.float32


def test_rules_that_freeze_a_factor_are_the_ones_expected():
    frozen = {name: FACTORS - get_rule(name).client_plan(1).train for name in RULES}
    assert {n for n, f in frozen.items() if f} == {"ffa-lora", "rolora"}
    assert frozen["ffa-lora"] == frozen["rolora"] == {"A"}


@pytest.mark.parametrize("name, options", [("glora", {"rank": 8, "restart": True}), ("flora", {}), ("florist", {})])
def test_no_dense_matrix_for_a_huge_layer(name, options):
    # 300,000 x 200,000 in float64 would be 480 GB; the factors are 8 clients x ~16 MB. GLoRA runs with restart
    # so that merge() hands back factors (a warm start merges nothing).
    d_out, d_in = 300_000, 200_000
    g = torch.Generator().manual_seed(0)
    ups = [
        LowRank(torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), 2.0)
        for r in (2, 4, 8, 8, 4, 2, 8, 4)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = get_rule(name, **options).aggregate(ups, [1.0] * 8)
    merged = state.merge()
    out = state.readout(rank=4, scale=2.0)
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert merged.B.shape[0] == d_out and merged.A.shape[1] == d_in
    assert out.B.shape == (d_out, 4) and out.A.shape == (4, d_in)
    assert grown_gb < 4.0  # far below one dense float32 copy (240 GB)


# gauge sensitivity and exactness on one fixture (the table in results/gauge_exactness.md)


def test_gauge_table_glora_and_flora_are_invariant_fedit_hetlora_fedsa_are_not():
    rows = {(r.rule, len(set(r.ranks)) > 1): r for r in gauge_table()}
    for name in ("glora", "flora"):
        for unequal in (False, True):
            assert rows[name, unequal].gauge_shift < 1e-12
    assert rows["flora", True].error < 1e-12
    for key in (("fedit", False), ("fedsa-lora", False), ("hetlora", False), ("hetlora", True)):
        assert rows[key].gauge_shift > 0.1
    assert rows["fedit", True].gauge_shift is None  # refuses ranks 2/4/8/16
    assert rows["glora, rank = sum r_i", True].error < 1e-12
    assert rows["glora, rank = sum r_i", True].ranks == UNEQUAL_RANKS
