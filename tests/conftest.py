"""Shared fixtures: random client updates on which the properties under test could fail."""

from __future__ import annotations

import pytest
import torch

from glora import LowRank
from glora.lowrank import random_gauge_matrix

# The suite's matrices are small: one thread avoids oversubscription on a 2-core machine.
torch.set_num_threads(1)


def make_updates(ranks, d_out=37, d_in=23, scale=2.0, seed=0, dtype=torch.float64, shared_A=False) -> list[LowRank]:
    """Generic client updates: independent Gaussian factors (unless ``shared_A``), non-square."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(ranks[0], d_in, generator=g, dtype=dtype)
    return [
        LowRank(
            torch.randn(d_out, r, generator=g, dtype=dtype),
            A0.clone() if shared_A else torch.randn(r, d_in, generator=g, dtype=dtype),
            scale,
        )
        for r in ranks
    ]


def random_gauges(updates, seed=1, cond_max=10.0) -> list[LowRank]:
    """Each update in a random well-conditioned gauge G_i (condition number cond_max)."""
    g = torch.Generator().manual_seed(seed)
    return [u.gauge(random_gauge_matrix(u.rank, g, cond=cond_max)) for u in updates]


def weighted_mean(updates, weights) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return sum(wi * u.delta().double() for wi, u in zip(w.tolist(), updates, strict=True))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def unequal():
    return make_updates([2, 4, 8, 3]), [10.0, 30.0, 5.0, 55.0]


@pytest.fixture
def equal():
    return make_updates([4, 4, 4]), [10.0, 30.0, 60.0]


@pytest.fixture
def task_identity():
    """Flower messages can only be built inside a Flower task: play the ServerApp's (run 1, node 1)."""
    from flwr.supercore.task_identity import TaskIdentity  # flower: imported only by the tests that use it

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
