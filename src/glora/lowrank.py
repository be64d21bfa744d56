"""One adapted layer's LoRA update, ``delta = scale * B @ A``, and its gauge-free form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Relative tolerance below which a singular value counts as zero (numerical rank).
DEFAULT_RTOL = 1e-10


@dataclass(frozen=True)
class Canonical:
    """Gauge-invariant thin SVD of an update: ``delta = X @ diag(sig) @ Y.T``.

    Shapes: X (d_out, q), sig (q,), Y (d_in, q), with q the numerical rank (0 when B = 0).
    X and Y have orthonormal columns; sig is sorted in decreasing order.
    """

    X: Tensor
    sig: Tensor
    Y: Tensor

    @property
    def rank(self) -> int:
        return int(self.sig.shape[0])


@dataclass(frozen=True)
class LowRank:
    """A LoRA update of one layer.

    Shapes: B (d_out, r), A (r, d_in); ``scale`` is lora_alpha / r (or rsLoRA's
    lora_alpha / sqrt(r)). The pair (B G, G^-1 A) represents the same update for any
    invertible G (r, r): that freedom is the gauge this package is built around.
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.B.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (d_out, d_in) of the dense update."""
        return (self.d_out, self.d_in)

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the two factors occupy: what sending them costs."""
        return self.B.numel() * self.B.element_size() + self.A.numel() * self.A.element_size()

    def delta(self) -> Tensor:
        """Dense (d_out, d_in) update. For tests and small layers only."""
        return self.scale * (self.B @ self.A)

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.B.to(dtype), self.A.to(dtype), self.scale)

    def gauge(self, G: Tensor) -> LowRank:
        """The same update in another gauge: (B G, G^-1 A). G: (r, r), invertible."""
        G = G.to(self.B.dtype)
        return LowRank(self.B @ G, torch.linalg.solve(G, self.A), self.scale)

    def canonical(self, rtol: float = DEFAULT_RTOL, dtype: torch.dtype | None = None) -> Canonical:
        """Gauge-invariant form (method.md step 1); cost O((d_out + d_in) r^2).

        Thin QR of B and of A^T, then an SVD of the small (r, r) core
        ``scale * R_B @ R_A^T``. Singular values below ``rtol * max(sig)`` are dropped.
        """
        dtype = dtype or self.B.dtype
        B, A = self.B.to(dtype), self.A.to(dtype)
        if self.rank == 0:
            return _empty_canonical(self.d_out, self.d_in, dtype)
        QB, RB = torch.linalg.qr(B)
        QA, RA = torch.linalg.qr(A.T)
        P, sig, Wh = torch.linalg.svd(self.scale * (RB @ RA.T))
        keep = numerical_rank(sig, rtol)
        return Canonical(QB @ P[:, :keep], sig[:keep], QA @ Wh[:keep].T)


def numerical_rank(sig: Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """Number of singular values (sorted, decreasing) above rtol times the largest."""
    if sig.numel() == 0 or not bool(sig[0] > 0):
        return 0
    return int((sig > rtol * sig[0]).sum())


def _empty_canonical(d_out: int, d_in: int, dtype: torch.dtype) -> Canonical:
    return Canonical(torch.zeros(d_out, 0, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(d_in, 0, dtype=dtype))


def lora_init_A(rank: int, d_in: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh LoRA A (rank, d_in) as peft initialises it.

    peft uses kaiming_uniform_(a=sqrt(5)), i.e. uniform on +-1/sqrt(d_in). Rows are drawn
    in order, so the first k rows are the same whatever ``rank`` is asked for.
    """
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


# Expected Euclidean norm of one row of :func:`lora_init_A`: d_in entries of variance
# bound^2 / 3 = 1 / (3 d_in), whatever d_in is.
LORA_INIT_ROW_NORM = 1.0 / math.sqrt(3.0)


def random_gauge_matrix(rank: int, generator: torch.Generator, cond: float = 4.0) -> Tensor:
    """A random invertible (rank, rank) gauge with singular values spread over [1/sqrt(cond), sqrt(cond)]:
    well conditioned, so applying it changes the factors a lot and the update only by round-off."""
    Q1, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    s = (
        torch.logspace(-0.5, 0.5, rank, base=cond, dtype=torch.float64)
        if rank > 1
        else torch.ones(1, dtype=torch.float64)
    )
    return (Q1 * s) @ Q2.T
