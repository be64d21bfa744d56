"""The two centralized references differ only in their step budget: ``centralized`` takes the
steps of every client sampled in a round (the examples the whole federation sees),
``centralized-steps`` one client's steps (its sequential optimizer steps), in the round loop
as in the step count the loop asks of a client."""

from __future__ import annotations

import pytest

from glora.aggregation import get_rule
from glora.experiments.sweep_results import REFERENCES
from glora.federation import client as client_module
from glora.federation.config import RunConfig
from glora.federation.engine import client_steps
from glora.federation.simulation import Federation

CFG = RunConfig(task="sst2", clients=10, fraction=0.3, local_steps=7, batch_size=16, ranks="8")


@pytest.mark.parametrize("fraction, sampled", [(1.0, 10), (0.3, 3), (0.05, 1)])
def test_the_federation_reference_takes_every_sampled_clients_steps_the_other_one_clients(fraction, sampled):
    cfg = CFG.replace(fraction=fraction)
    pooled = 5_000  # the pooled client's examples: every client's
    assert client_steps(cfg, get_rule("centralized"), pooled) == 7 * sampled
    assert client_steps(cfg, get_rule("centralized-steps"), pooled) == 7
    assert client_steps(cfg, get_rule("glora"), 500) == 7


def test_under_local_epochs_the_client_budget_is_a_mean_clients_epochs():
    cfg = CFG.replace(local_epochs=2.0)
    # 5,000 pooled examples over 10 clients: a mean client holds 500, 2 epochs of batch 16
    assert client_steps(cfg, get_rule("centralized-steps"), 5_000) == 63  # ceil(2 * 500 / 16)
    assert client_steps(cfg, get_rule("centralized"), 5_000) == 625  # ceil(2 * 5000 / 16)


def test_a_budget_the_loop_does_not_know_is_refused_when_the_rule_is_defined():
    from glora.aggregation.reference import Centralized

    with pytest.raises(TypeError, match="pooled_budget is 'federation' or 'client', not 'clients'"):
        type("Typo", (Centralized,), {"name": "typo", "pooled_budget": "clients"})


def test_the_references_are_the_rules_that_declare_themselves_so():
    assert set(REFERENCES) == {"centralized", "centralized-steps", "local"}


def test_the_sampled_fraction_is_no_part_of_a_client_budget_references_identity():
    from glora.experiments.grid.preset import canonical

    steps = RunConfig(task="sst2", rule="centralized-steps", clients=50, alpha=0.5, ranks="2,8")
    assert canonical(steps.replace(fraction=0.1)).identity() == canonical(steps).identity()
    wide = steps.replace(rule="centralized")
    assert canonical(wide.replace(fraction=0.1)).identity() != canonical(wide).identity()


@pytest.mark.parametrize("rule, steps", [("centralized", 3 * 2), ("centralized-steps", 2)])
def test_a_run_trains_the_pooled_client_for_its_budget(tmp_path, monkeypatch, rule, steps):
    seen = []
    real = client_module.local_train

    def spy(*args, **kwargs):
        seen.append(args[5])  # the steps
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "local_train", spy)
    cfg = RunConfig(
        task="sst2",
        rule=rule,
        clients=3,
        alpha=None,
        ranks="4",
        rounds=2,
        local_steps=2,
        batch_size=8,
        eval_every=2,
        max_train_examples=120,
        max_eval_examples=32,
        threads=1,
    )
    Federation(cfg, tmp_path / rule, progress=False).run()
    assert seen == [steps, steps]  # one pooled client a round
