import torch

from glora import LowRank
from glora.lowrank import numerical_rank

from .conftest import make_updates, random_gauges, rel_err


def test_canonical_form_reconstructs_the_update():
    (u,) = make_updates([5])
    c = u.canonical()
    assert c.rank == 5
    assert rel_err(c.X @ torch.diag(c.sig) @ c.Y.T, u.delta()) < 1e-12
    assert torch.allclose(c.X.T @ c.X, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(c.Y.T @ c.Y, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_canonical_form_is_gauge_invariant_while_factors_are_not():
    (u,) = make_updates([4])
    (v,) = random_gauges([u])
    assert rel_err(v.B, u.B) > 0.1  # the factors really changed
    cu, cv = u.canonical(), v.canonical()
    assert torch.allclose(cu.sig, cv.sig, rtol=1e-10)
    # Singular vectors agree up to sign: compare projectors.
    assert rel_err(cv.X @ cv.X.T, cu.X @ cu.X.T) < 1e-10
    assert rel_err(cv.Y @ cv.Y.T, cu.Y @ cu.Y.T) < 1e-10


def test_canonical_rank_is_numerical_rank():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 6, generator=g, dtype=torch.float64)
    B[:, 3:] = B[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)  # rank 3
    u = LowRank(B, torch.randn(6, 20, generator=g, dtype=torch.float64), 1.0)
    assert u.canonical().rank == 3
    assert LowRank(torch.zeros(30, 6, dtype=torch.float64), u.A).canonical().rank == 0


def test_numerical_rank_counts_relative_to_largest():
    assert numerical_rank(torch.tensor([2.0, 1.0, 1e-20])) == 2
    assert numerical_rank(torch.zeros(3)) == 0
    assert numerical_rank(torch.zeros(0)) == 0
