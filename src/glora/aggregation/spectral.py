"""A layer update held as its thin SVD, read out at any rank: GLoRA's state, and that of
every rule whose server step ends in an SVD (FlexLoRA, FLoRIST)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, fresh_adapter
from glora.lowrank import LORA_INIT_ROW_NORM, LowRank, lora_init_A

# How a readout splits the singular values between B and A (the update is the same):
# "balanced": sqrt(lam) on each side; "a-normal": A's rows orthonormal at the norm of a
# LoRA initialisation, magnitudes in B; "a-orthonormal": A's rows orthonormal (unit
# norm), magnitudes in B, as FlexLoRA's reference code does.
ReadoutGauge = Literal["balanced", "a-normal", "a-orthonormal"]
A_ROW_NORM = {"a-normal": LORA_INIT_ROW_NORM, "a-orthonormal": 1.0}


@dataclass(frozen=True)
class SpectralState(LayerState):
    """A layer update held as its thin SVD: Delta = Ub diag(lam) Q^T.

    Shapes: Ub (d_out, k) and Q (d_in, k) orthonormal columns, lam (k,) decreasing, all
    in the server dtype. ``out_dtype`` is the clients' dtype for readouts; ``seed`` fixes
    the fresh LoRA rows that pad a readout when k < r.
    """

    Ub: Tensor
    lam: Tensor
    Q: Tensor
    out_dtype: torch.dtype
    gauge: ReadoutGauge = "balanced"
    seed: int = 0
    restart: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.Ub.shape[0]), int(self.Q.shape[0]))

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])

    def readout(self, rank: int, scale: float) -> LowRank:
        if rank < 1:
            raise ValueError(f"readout rank must be >= 1, got {rank}")
        if scale <= 0:
            raise ValueError(f"readout scale must be > 0, got {scale}")
        d_out, d_in = self.shape
        if self.restart:
            return fresh_adapter(rank, d_out, d_in, scale, self.seed, self.out_dtype)
        return self.truncated(rank, scale)

    def truncated(self, rank: int, scale: float) -> LowRank:
        """The best rank-``rank`` approximation of the state, as factors with ``scale``."""
        d_out, d_in = self.shape
        k = min(rank, self.rank)
        lam, Ub, Q = self.lam[:k], self.Ub[:, :k], self.Q[:, :k]
        if self.gauge == "balanced":
            root = torch.sqrt(lam / scale)
            B, A = Ub * root, root[:, None] * Q.T
        else:
            c = A_ROW_NORM[self.gauge]
            B, A = Ub * (lam / (scale * c)), c * Q.T
        if k < rank:
            # Zero columns of B with fresh rows of A: the update is unchanged and local
            # training can still move (B = 0 and A = 0 together would freeze the adapter).
            g = torch.Generator().manual_seed(self.seed)
            pad_A = lora_init_A(rank, d_in, g, B.dtype)[k:]
            B = torch.cat([B, B.new_zeros(d_out, rank - k)], dim=1)
            A = torch.cat([A, pad_A], dim=0)
        return LowRank(B.to(self.out_dtype), A.to(self.out_dtype), scale)

    def tail(self, rank: int, scale: float) -> LowRank | None:
        """What a rank-``rank`` readout leaves out: the state's components beyond ``rank``,
        as factors with ``scale`` (B (d_out, k - rank), A (k - rank, d_in)); None where the
        readout holds the whole state. truncated(rank) + tail(rank) is the state."""
        if rank >= self.rank:
            return None
        lam, Ub, Q = self.lam[rank:], self.Ub[:, rank:], self.Q[:, rank:]
        return LowRank((Ub * (lam / scale)).to(self.out_dtype), Q.T.to(self.out_dtype), scale)

    def merge(self) -> LowRank | None:
        if not self.restart or self.rank == 0:
            return None
        return self.truncated(self.rank, 1.0)

    def total(self) -> LowRank:
        # In the server dtype: the clients' dtype would round the singular values.
        return LowRank(self.Ub * self.lam, self.Q.T, 1.0)

    def delta(self) -> Tensor:
        return ((self.Ub * self.lam) @ self.Q.T).to(self.out_dtype)
