"""Every bad input gets a ValueError that names the client and the problem; nothing is modified."""

import pytest
import torch

from glora import RULES, LowRank, get_rule
from glora.aggregation import average_params

from .conftest import make_updates

RULE_NAMES = sorted(RULES)
EQUAL_RANK_RULES = sorted(name for name, cls in RULES.items() if not cls.accepts_unequal_ranks)


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0, 1.0], "client 1: weight -1.0 is negative"),
        ([1.0, float("nan"), 1.0], "client 1: weight nan is not finite"),
        ([1.0, float("inf"), 1.0], "client 1: weight inf is not finite"),
        ([0.0, 0.0, 0.0], "all client weights are zero"),
        ([1.0, 1.0], "got 2 weights for 3 client updates"),
    ],
)
def test_bad_weights(name, weights, match):
    with pytest.raises(ValueError, match=match):
        get_rule(name).aggregate(make_updates([4, 4, 4]), weights)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_empty_client_list(name):
    with pytest.raises(ValueError, match="empty client list"):
        get_rule(name).aggregate([], [])


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("factor", ["B", "A"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor(name, factor, bad):
    ups = make_updates([4, 4, 4])
    t = getattr(ups[2], factor).clone()
    t[0, 0] = bad
    ups[2] = LowRank(t, ups[2].A, ups[2].scale) if factor == "B" else LowRank(ups[2].B, t, ups[2].scale)
    with pytest.raises(ValueError, match=f"client 2: factor {factor} contains NaN or Inf"):
        get_rule(name).aggregate(ups, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", RULE_NAMES)
def test_layer_shapes_disagree(name):
    ups = make_updates([4, 4]) + make_updates([4], d_out=36)
    with pytest.raises(ValueError, match=r"client 2: layer shape \(d_out, d_in\) = \(36, 23\)"):
        get_rule(name).aggregate(ups, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", RULE_NAMES)
def test_factor_ranks_disagree(name):
    ups = make_updates([4, 4])
    ups[1] = LowRank(ups[1].B, ups[1].A[:3], ups[1].scale)
    with pytest.raises(ValueError, match=r"client 1: B has rank 4 .* but A has 3 rows"):
        get_rule(name).aggregate(ups, [1.0, 1.0])


def test_the_rules_needing_equal_ranks_are_the_ones_their_authors_define_so():
    # centralized aggregates one pooled client; the loop pools before it aggregates.
    assert EQUAL_RANK_RULES == [
        "centralized",
        "centralized-steps",
        "fedex-lora",
        "fedit",
        "fedsa-lora",
        "ffa-lora",
        "rolora",
    ]


@pytest.mark.parametrize("name", EQUAL_RANK_RULES)
def test_rule_needing_equal_ranks_names_itself_and_the_ranks(name):
    with pytest.raises(ValueError, match=rf"rule '{name}' needs equal client ranks but got ranks \[2, 4, 8\]"):
        get_rule(name).aggregate(make_updates([2, 4, 8]), [1.0, 1.0, 1.0])


def test_unknown_rule_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'fedavg'; available rules: ") as err:
        get_rule("fedavg")
    assert all(name in str(err.value) for name in RULES)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="option consensus 'vote': allowed 'projector', 'energy'"):
        get_rule("glora", consensus="vote")
    with pytest.raises(ValueError, match="rule 'glora': unknown option 'rnk'"):
        get_rule("glora", rnk=4)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_inputs_are_not_modified(name):
    # shared_A: valid input for every rule, including those that freeze A
    ups = make_updates([4, 4, 4], shared_A=True)
    copies = [(u.B.clone(), u.A.clone()) for u in ups]
    state = get_rule(name).aggregate(ups, [1.0, 2.0, 3.0])
    out = state.readout(4, 2.0)
    out.B.add_(1.0)
    out.A.add_(1.0)
    for u, (B, A) in zip(ups, copies, strict=True):
        assert torch.equal(u.B, B) and torch.equal(u.A, A)


def test_head_parameters_are_averaged_with_the_same_weights():
    heads = [{"w": torch.full((2, 3), float(i)), "b": torch.full((2,), float(i))} for i in range(3)]
    avg = average_params(heads, [1.0, 1.0, 2.0])
    assert torch.allclose(avg["w"], torch.full((2, 3), 1.25))
    with pytest.raises(ValueError, match="client 1: parameter 'w' has shape"):
        average_params([heads[0], {"w": torch.zeros(3, 3), "b": torch.zeros(2)}], [1.0, 1.0])
