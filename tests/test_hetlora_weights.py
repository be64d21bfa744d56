"""HetLoRA's client weights (issue #30): the data weights multiply the paper's update-norm
weights by default, so a client of data weight 0 cannot move the aggregate; the old rule (norm
weights alone) is ``data_weighted=False``, with its numbers, and every run recorded under it
keeps its identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glora import LowRank, get_rule
from glora.aggregation.hetlora import update_norms
from glora.federation.checks import check_config
from glora.federation.config import RunConfig

from .conftest import make_updates, rel_err
from .test_aggregation_baselines import hetlora_example, normalized

ROOT = Path(__file__).resolve().parents[1]


def clean_and_outlier():
    """Three clean clients of ranks 2, 4, 8 and an outlier of rank 4 whose update is 100x theirs."""
    clean = make_updates([2, 4, 8], seed=3)
    bad = make_updates([4], seed=4)[0]
    return clean, LowRank(100 * bad.B, bad.A, bad.scale), [10.0, 30.0, 5.0]


def test_a_client_of_data_weight_zero_cannot_move_the_aggregate():
    clean, outlier, w = clean_and_outlier()
    rule = get_rule("hetlora")
    alone = rule.aggregate(clean, w)
    with_outlier = rule.aggregate([*clean, outlier], [*w, 0.0])
    assert torch.equal(with_outlier.adapter.B, alone.adapter.B)
    assert torch.equal(with_outlier.adapter.A, alone.adapter.A)
    for r in (2, 4, 8):
        assert torch.equal(with_outlier.readout(r, 2.0).B, alone.readout(r, 2.0).B)
    # The norm weights alone (the old default) let it take the aggregate over: this property fails there.
    old = get_rule("hetlora", data_weighted=False)
    moved = old.aggregate([*clean, outlier], [*w, 0.0]).delta() - old.aggregate(clean, w).delta()
    assert moved.norm() > 10 * old.aggregate(clean, w).delta().norm()


def test_by_default_the_data_weights_multiply_the_norm_weights():
    ups = hetlora_example()  # update norms 5, 2, 4
    p = get_rule("hetlora").aggregation_weights(ups, normalized([1.0, 5.0, 2.0]))
    assert torch.allclose(p, torch.tensor([5.0, 10.0, 8.0], dtype=torch.float64) / 23, rtol=1e-15)
    # Uniform client weights (--weighting uniform) give the paper's norm weights unchanged.
    uniform = get_rule("hetlora").aggregation_weights(ups, normalized([1.0, 1.0, 1.0]))
    assert torch.allclose(uniform, torch.tensor([5.0, 2.0, 4.0], dtype=torch.float64) / 11, rtol=1e-15)
    # Round 0 (every update zero): the data weights, as before.
    zero = [LowRank(torch.zeros_like(u.B), u.A, u.scale) for u in ups]
    assert torch.equal(
        get_rule("hetlora").aggregation_weights(zero, normalized([1.0, 5.0, 2.0])), normalized([1, 5, 2])
    )


def test_data_weighted_false_reproduces_the_old_numbers_exactly(unequal):
    # The old rule's numbers, computed by hand (the example counts do not enter).
    ups = hetlora_example()
    rule = get_rule("hetlora", data_weighted=False)
    state = rule.aggregate(ups, [100.0, 1.0, 7.0])
    p = rule.aggregation_weights(ups, normalized([100.0, 1.0, 7.0]))
    assert torch.allclose(p, torch.tensor([5 / 11, 2 / 11, 4 / 11], dtype=torch.float64), rtol=1e-15)
    col = torch.tensor([1, 1, 6 / 11, 6 / 11, 4 / 11, 4 / 11, 4 / 11, 4 / 11], dtype=torch.float64)
    row = torch.tensor([29, 26, 6, 6, 4, 4, 4, 4], dtype=torch.float64) / 11
    assert torch.allclose(state.adapter.B, torch.eye(10, 8, dtype=torch.float64) * col, atol=1e-15)
    assert torch.allclose(state.adapter.A, row[:, None] * torch.eye(8, 9, dtype=torch.float64), atol=1e-15)
    # On generic updates: bit for bit the old formula p_i = ||Delta_i|| / sum_j ||Delta_j||.
    ups, w = unequal
    norms = update_norms(ups)
    assert torch.equal(rule.aggregation_weights(ups, normalized(w)), norms / norms.sum())
    assert rel_err(rule.aggregate(ups, w).delta(), get_rule("hetlora").aggregate(ups, w).delta()) > 1e-3


def test_the_option_is_typed_as_a_bool():
    assert check_config(RunConfig(rule="hetlora", rule_options={"data_weighted": "false"})).data_weighted is False
    assert check_config(RunConfig(rule="hetlora")).data_weighted is True
    with pytest.raises(ValueError, match="option data_weighted 'maybe': give true or false"):
        check_config(RunConfig(rule="hetlora", rule_options={"data_weighted": "maybe"}))


def recorded_hetlora_configs() -> list[dict]:
    paths = [*ROOT.glob("results/*/runs/*/config.json"), *ROOT.glob("results/sweeps/*/*/config.json")]
    configs = [json.loads(p.read_text()) for p in paths]
    return [c for c in configs if c.get("rule") == "hetlora"]


def test_recorded_hetlora_runs_keep_their_identity_and_their_rule():
    saved = json.loads((ROOT / "results" / "sst2-comparison" / "runs" / "hetlora" / "config.json").read_text())
    assert saved["rule_options"] == {} and saved["identity"] == "b951f62ad5f0"
    old = RunConfig.from_saved(saved)
    assert old.identity() == saved["identity"]
    assert get_rule(old.rule, **old.rule_options).data_weighted is False  # a resume continues the old rule
    # Its options given today mean the new default: another computation, another identity.
    assert old.replace(rule_options={}).identity() != saved["identity"]
    assert RunConfig.from_saved({**saved, "rule_options": {"data_weighted": True}}).identity() != saved["identity"]
    assert RunConfig.from_saved({**saved, "rule_options": {"data_weighted": False}}).identity() == saved["identity"]

    recorded = recorded_hetlora_configs()
    assert len(recorded) >= 50
    assert all(RunConfig.from_saved(c).identity() == c["identity"] for c in recorded)
