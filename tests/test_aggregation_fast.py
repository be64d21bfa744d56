"""GLoRA's batched Gram route (``aggregate_layers``) against the per-layer QR + SVD path.

Each test also checks which route served the layers, so a silent fall-back to the exact
path cannot make a test of the batched route pass.
"""

import resource

import pytest
import torch

from glora import LowRank, get_rule
from glora.aggregation.glora import GLoRA
from glora.aggregation.glora_batched import GRAM_TOL

from .conftest import make_updates, random_gauges, rel_err, weighted_mean

WEIGHTS = [10.0, 30.0, 5.0, 55.0]


@pytest.fixture
def per_layer_calls(monkeypatch):
    """How many layers went through the per-layer ``aggregate`` (the exact path)."""
    calls = {"n": 0}
    exact = GLoRA.aggregate

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return exact(self, *args, **kwargs)

    monkeypatch.setattr(GLoRA, "aggregate", counting)
    return calls


def model(ranks=(2, 4, 8, 3), seed=0, dtype=torch.float64) -> dict[str, list[LowRank]]:
    """Five layers of two shapes (two batches), interleaved so that order matters."""
    shapes = [(37, 23), (29, 41), (37, 23), (29, 41), (37, 23)]
    return {
        f"layer{j}": make_updates(list(ranks), d_out=o, d_in=i, seed=seed + j, dtype=dtype)
        for j, (o, i) in enumerate(shapes)
    }


OPTIONS = [
    {},
    {"sides": 2},
    {"consensus": "energy"},
    {"rank": 5},
    {"rank": 4, "threshold": 0.3},
    {"rank": 6, "threshold": 0.2, "consensus": "energy", "sides": 2},
    {"readout_gauge": "a-normal"},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_batched_route_gives_the_per_layer_states(options, per_layer_calls):
    ups = model()
    rule = get_rule("glora", **options)
    states = rule.aggregate_layers(ups, WEIGHTS)
    assert per_layer_calls["n"] == 0  # every layer took the batched route
    assert list(states) == list(ups)
    for name, layer in ups.items():
        ref = rule.aggregate(layer, WEIGHTS)
        assert states[name].rank == ref.rank
        # GRAM_TOL bounds the Gram route's predicted error; the data here is well inside it.
        assert rel_err(states[name].delta(), ref.delta()) < GRAM_TOL[torch.float64]
        assert rel_err(states[name].readout(3, 2.0).delta(), ref.readout(3, 2.0).delta()) < GRAM_TOL[torch.float64]


def test_batched_route_is_gauge_invariant_and_exact_at_full_rank(per_layer_calls):
    ups = model()
    moved = {n: random_gauges(layer, seed=7) for n, layer in ups.items()}
    rule = get_rule("glora", rank=sum((2, 4, 8, 3)))
    a, b = rule.aggregate_layers(ups, WEIGHTS), rule.aggregate_layers(moved, WEIGHTS)
    assert per_layer_calls["n"] == 0
    for name, layer in ups.items():
        assert rel_err(a[name].delta(), b[name].delta()) < 1e-10
        assert rel_err(a[name].delta(), weighted_mean(layer, WEIGHTS)) < 1e-10


def test_float32_server_math_agrees_with_float64_on_the_batched_route(per_layer_calls):
    # Real-shaped and in the clients' usual float32: what a server round sees.
    ups = {f"q{j}": make_updates([4, 8, 16, 8, 4], d_out=256, d_in=192, seed=j, dtype=torch.float32) for j in range(3)}
    w = [3.0, 1.0, 2.0, 5.0, 4.0]
    d64 = get_rule("glora").aggregate_layers(ups, w)
    d32 = get_rule("glora", dtype=torch.float32).aggregate_layers(ups, w)
    assert per_layer_calls["n"] == 0
    for name in ups:
        assert d32[name].Ub.dtype == torch.float32 and d64[name].Ub.dtype == torch.float64
        # Stated tolerance: GRAM_TOL[float32] = 1e-4, the bound the float32 route is gated on.
        assert rel_err(d32[name].delta(), d64[name].delta()) < GRAM_TOL[torch.float32]


def test_ill_conditioned_layers_take_the_exact_path(per_layer_calls):
    # Gauges of condition 1e4 square to 1e8 in a Gram matrix: beyond the float32 gate (and,
    # with the spread of the consensus eigenvalues, the float64 one); the result must still
    # be the exact path's.
    ups = {n: random_gauges(layer, seed=3, cond_max=1e4) for n, layer in model().items()}
    for dtype in (torch.float64, torch.float32):
        per_layer_calls["n"] = 0
        rule = get_rule("glora", dtype=dtype)
        states = rule.aggregate_layers(ups, WEIGHTS)
        assert per_layer_calls["n"] > 0
        for name, layer in ups.items():
            assert rel_err(states[name].delta(), rule.aggregate(layer, WEIGHTS).delta()) < 1e-12


def test_repeated_directions_take_the_exact_path(per_layer_calls):
    # Two clients with the same update: at R = sum r_i some consensus eigenvalues are exactly
    # zero, which a Gram matrix cannot tell from rounding.
    layer = make_updates([3, 3, 5])
    ups = {"a": [layer[0], layer[0], layer[2]]}
    rule = get_rule("glora", rank=11)
    state = rule.aggregate_layers(ups, [1.0, 1.0, 2.0])["a"]
    assert per_layer_calls["n"] == 1
    assert rel_err(state.delta(), weighted_mean(ups["a"], [1.0, 1.0, 2.0])) < 1e-12


def test_zero_updates_and_zero_weights_on_the_batched_route(per_layer_calls):
    ups = model()
    for layer in ups.values():
        layer[1] = LowRank(torch.zeros_like(layer[1].B), layer[1].A, 2.0)  # an untrained client
    w = [1.0, 2.0, 0.0, 3.0]  # and one that does not count
    rule = get_rule("glora", rank=13)  # covers what is left: the exact mean
    states = rule.aggregate_layers(ups, w)
    assert per_layer_calls["n"] == 0
    for name, layer in ups.items():
        assert rel_err(states[name].delta(), weighted_mean(layer, w)) < 1e-10


def test_round_zero_on_the_batched_route(per_layer_calls):
    ups = {
        f"l{j}": [
            LowRank(torch.zeros(30, r, dtype=torch.float64), torch.randn(r, 20, dtype=torch.float64), 2.0)
            for r in (2, 4)
        ]
        for j in range(3)
    }
    states = get_rule("glora").aggregate_layers(ups, [1.0, 1.0])
    assert per_layer_calls["n"] == 0
    for s in states.values():
        assert s.rank == 0
        out = s.readout(4, 2.0)
        assert torch.count_nonzero(out.B) == 0 and float(out.A.norm()) > 0.5


def test_bad_input_gets_the_per_layer_error():
    ups = model()
    bad = ups["layer3"][2]
    A = bad.A.clone()
    A[1, 2] = float("inf")
    ups["layer3"][2] = LowRank(bad.B, A, bad.scale)
    with pytest.raises(ValueError, match="client 2: factor A contains NaN or Inf"):
        get_rule("glora").aggregate_layers(ups, WEIGHTS)
    ups = model()
    ups["layer1"][0] = LowRank(ups["layer1"][0].B, ups["layer1"][0].A[:1], 2.0)
    with pytest.raises(ValueError, match="client 0: B has rank"):
        get_rule("glora").aggregate_layers(ups, WEIGHTS)
    with pytest.raises(ValueError, match="got 3 weights for 4 client updates"):
        get_rule("glora").aggregate_layers(model(), WEIGHTS[:3])


def test_memory_blend_uses_the_previous_state(per_layer_calls):
    ups = model()
    rule = get_rule("glora", rank=4, memory=0.5)
    first = rule.aggregate_layers(ups, WEIGHTS)
    assert per_layer_calls["n"] == 0  # no previous state yet: batched
    later = {n: layer[::-1][:2] for n, layer in ups.items()}
    blended = rule.aggregate_layers(later, WEIGHTS[:2], previous=first)
    assert per_layer_calls["n"] == len(ups)
    for name, layer in later.items():
        ref = rule.aggregate(layer, WEIGHTS[:2], previous=first[name])
        assert rel_err(blended[name].delta(), ref.delta()) < 1e-12


def test_no_dense_matrix_on_the_batched_route(per_layer_calls):
    # Two 200,000 x 100,000 layers: a dense float64 update would be 160 GB each.
    d_out, d_in = 200_000, 100_000
    g = torch.Generator().manual_seed(0)
    ups = {
        f"l{j}": [
            LowRank(torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), 2.0) for r in (2, 4, 8, 4)
        ]
        for j in range(2)
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    states = get_rule("glora", rank=8).aggregate_layers(ups, [1.0] * 4)
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert per_layer_calls["n"] == 0
    assert states["l1"].readout(4, 2.0).B.shape == (d_out, 4)
    assert grown_gb < 2.0  # the factors themselves are 0.26 GB; one dense layer would be 160 GB


# Every server-rank policy GLoRA accepts (an int, and the policies over the client ranks),
# crossed with the options that change which directions are kept.
RANK_POLICIES = [3, "max", "2max", "sum", "sum<=10"]
KEEP_OPTIONS = [
    {},
    {"sides": 2},
    {"consensus": "energy"},
    {"threshold": 0.2},
    {"threshold": 0.1, "consensus": "energy", "sides": 2},
]


@pytest.mark.parametrize("rank", RANK_POLICIES)
@pytest.mark.parametrize("options", KEEP_OPTIONS)
def test_batched_and_per_layer_routes_agree_for_every_rank_policy(rank, options, per_layer_calls):
    g = torch.Generator().manual_seed(12)
    ranks = [int(r) for r in torch.randint(1, 9, (5,), generator=g)]
    ranks[0], ranks[1] = 1, 8  # heterogeneous whatever the draw; this one gives sum 24, so that
    # the five policies mean five different R (3, 8, 16, 24, 10) and both thresholds cut some
    w = torch.rand(5, generator=g).add(0.1).tolist()
    shapes = [(64, 48), (50, 72), (64, 48), (50, 72)]
    ups = {
        f"l{j}": make_updates(ranks, d_out=o, d_in=i, seed=100 + j, scale=float(torch.rand(1, generator=g)) + 0.5)
        for j, (o, i) in enumerate(shapes)
    }
    rule = get_rule("glora", rank=rank, **options)
    states = rule.aggregate_layers(ups, w)
    assert per_layer_calls["n"] == 0  # the batched route served every layer
    for name, layer in ups.items():
        ref = rule.aggregate(layer, w)
        assert states[name].rank == ref.rank
        assert rel_err(states[name].delta(), ref.delta()) < 1e-6
        for r in (1, 4):
            assert rel_err(states[name].readout(r, 2.0).delta(), ref.readout(r, 2.0).delta()) < 1e-6
