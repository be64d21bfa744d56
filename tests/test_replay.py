"""Replaying the server on recorded client updates: the replayed default is the run's own
server step, exact rules sit at the exact mean, run folders are only read, and the
pre-registered choice follows the paired intervals."""

from __future__ import annotations

import hashlib

import pytest
import torch

from glora.aggregation import get_rule
from glora.experiments.replay import (
    CANDIDATES,
    REFERENCE,
    Replay,
    choose_default,
    exact_mean,
    recorded_updates,
    relative_distance,
    report_markdown,
    state_floats,
    verdict,
)
from glora.experiments.statistics import Stat
from glora.federation.config import RunConfig
from glora.federation.results import RunStore
from glora.federation.simulation import run_federation
from tests.conftest import make_updates

RUN = RunConfig(
    task="sst2",
    clients=3,
    min_client_examples=10,
    ranks="2,4,4",
    rounds=2,
    local_steps=2,
    batch_size=16,
    eval_every=2,
    max_train_examples=240,
    max_eval_examples=40,
    threads=1,
    record_updates=True,
    rule_options={"rank": "max"},  # the replay's reference candidate, so its step is the run's own
)


def test_distance_and_state_size_on_known_updates():
    ups = {"l": make_updates([2, 3], d_out=6, d_in=5)}
    mean = exact_mean(ups, [1.0, 3.0])
    expected = 0.25 * ups["l"][0].delta().double() + 0.75 * ups["l"][1].delta().double()
    assert torch.allclose(mean["l"], expected)
    assert relative_distance(mean, mean) == 0.0
    assert relative_distance({"l": 2 * mean["l"]}, mean) == pytest.approx(1.0)
    state = get_rule("glora").aggregate(ups["l"], [1.0, 3.0])
    assert state_floats(state) == state.Ub.numel() + state.lam.numel() + state.Q.numel()


@pytest.mark.slow
def test_replayed_default_is_the_runs_own_server_step_and_the_run_is_only_read(tmp_path):
    folder = tmp_path / "run"
    run_federation(RUN, folder, progress=False)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    replay = Replay(folder, max_eval_examples=40)
    rows = {r["candidate"]: r for r in replay.round(2, CANDIDATES)}
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    # The run's checkpoint holds GLoRA's state after round 2: the replayed default must equal it.
    state = RunStore(folder).load_checkpoint()["state"]
    own = {n: s.delta().double() for n, s in state.layers.items()}
    mean = exact_mean(*_round_inputs(folder, 2))
    assert rows[REFERENCE]["dist"] == pytest.approx(relative_distance(own, mean), rel=1e-6)
    last = RunStore(folder).metrics()[-1]["eval"]["accuracy"]
    assert rows[REFERENCE]["accuracy"] == pytest.approx(last)
    for exact in ("flora", "flexlora"):
        assert rows[exact]["dist"] < 1e-6
    assert "fedit" not in rows and "fedex-lora" not in rows  # equal-rank rules, unequal ranks here
    assert rows["glora R=sum<=64"]["dist"] < 1e-6  # R = 10 >= sum of ranks: the exact mean


def _round_inputs(folder, t):
    record = RunStore(folder).load_updates(t)
    return recorded_updates(record), [float(w) for w in record["weights"]]


def _rows(shift: dict[str, list[float]]) -> list[dict]:
    rows = []
    for setting in ("a", "b", "c"):
        for seed in range(5):
            for cand, deltas in shift.items():
                loss = 0.5 + 0.01 * seed + deltas[seed]
                rows.append(
                    {
                        "setting": setting,
                        "seed": seed,
                        "round": 3,
                        "candidate": cand,
                        "loss": loss,
                        "accuracy": 1 - loss,
                    }
                )
    return rows


def test_choice_follows_the_paired_intervals():
    clear = [-0.02, -0.021, -0.019, -0.02, -0.022]
    noisy = [-0.05, 0.04, -0.03, 0.05, -0.02]
    rows = _rows({REFERENCE: [0.0] * 5, "glora R=2max": clear, "glora energy,R=max": noisy})
    chosen, diffs = choose_default(rows)
    assert chosen == "glora R=2max"
    assert verdict(diffs["glora energy,R=max"]) == "tie"
    assert "Chosen by the rule: **glora R=2max**" in report_markdown(rows, "t")
    # Only ties: the current default stays.
    rows = _rows({REFERENCE: [0.0] * 5, "glora energy,R=max": noisy})
    assert choose_default(rows)[0] == REFERENCE


def test_interval_is_the_t_interval():
    stat = Stat.of([1.0, 2.0, 3.0])
    lo, hi = stat.interval()
    assert (lo, hi) == pytest.approx((2.0 - 4.302653 / 3**0.5, 2.0 + 4.302653 / 3**0.5), rel=1e-5)
    assert Stat.of([1.0]).interval() is None
