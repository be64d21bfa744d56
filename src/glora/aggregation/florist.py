"""FLoRIST (Ramesh, Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models", arXiv 2506.09199, 2025; MLSys 2026):
the SVD of the stacked mean without a dense matrix, truncated by an energy threshold.

Server step, per layer:
1. stack as FLoRA does: B_s = [B_1 | ... | B_K] (d_out, R), A_s = [w_1 s_1 A_1; ...]
   (R, d_in) with R = sum r_i, so that B_s A_s is the exact weighted mean update;
2. thin SVDs of each stack separately: B_s = U_B S_B V_B^T, A_s = U_A S_A V_A^T
   (cost O((d_out + d_in) R^2));
3. the small (R, R) core M = S_B V_B^T U_A S_A and its SVD M = P diag(sig) Q^T, so
   that B_s A_s = (U_B P) diag(sig) (V_A Q)^T: the update's exact SVD;
4. the global rank p is the smallest whose singular values hold a fraction
   ``threshold`` of the energy; the global factors are the leading p components.
Every client merges the global factors into its frozen base weight and starts the next
round from a fresh LoRA adapter of its own rank. No d_out x d_in matrix is formed.

Where the paper's text left us a choice (only its abstract and third-party summaries
were available to us): "energy" is sum sig^2 by default (the fraction of
||Delta||_F^2 kept; the relative error of the truncation is then sqrt(1 - threshold)),
with ``energy="linear"`` (sum sig) as the alternative; the paper tunes the threshold
per task, and 0.9 is our default. With ``threshold=1`` every non-zero singular value is
kept and the merged update is the exact weighted mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule
from glora.aggregation.spectral import SpectralState
from glora.lowrank import DEFAULT_RTOL, LowRank, numerical_rank

Energy = Literal["squared", "linear"]


def energy_rank(sig: Tensor, threshold: float, energy: Energy = "squared") -> int:
    """Smallest p such that the leading p of ``sig`` (sorted, decreasing) hold at least
    ``threshold`` of the total energy (sum sig^2, or sum sig for "linear"). 0 for all-zero sig."""
    e = sig**2 if energy == "squared" else sig.clone()
    total = float(e.sum())
    if total == 0:
        return 0
    before = torch.cumsum(e, 0) - e  # energy held by the components ahead of each one
    return int((before < threshold * total).sum())


class FLoRIST(Rule):
    """Stacked SVDs combined in a small core, global rank by energy threshold, merge and restart;
    any client ranks.

    threshold: fraction of the update's energy the global factors keep, in (0, 1].
    energy: "squared" (sum of sig^2) or "linear" (sum of sig).
    dtype: server math dtype (float64 default).
    rtol: relative tolerance below which singular values count as zero.
    seed: seed of the fresh adapters; it advances by one every round (from the previous state).
    """

    name = "florist"

    def __init__(
        self,
        threshold: float = 0.9,
        energy: Energy = "squared",
        dtype: torch.dtype = torch.float64,
        rtol: float = DEFAULT_RTOL,
        seed: int = 0,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"florist: threshold must be in (0, 1], got {threshold}")
        if energy not in ("squared", "linear"):
            raise ValueError(f"florist: energy must be 'squared' or 'linear', got {energy!r}")
        self.threshold, self.energy, self.dtype, self.rtol, self.seed = threshold, energy, dtype, rtol, seed

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> SpectralState:
        dt = self.dtype
        B_s = torch.cat([u.B.to(dt) for u in updates], dim=1)
        A_s = torch.cat([u.A.to(dt) * (w * u.scale) for w, u in zip(weights.tolist(), updates, strict=True)])
        U_B, S_B, Vh_B = torch.linalg.svd(B_s, full_matrices=False)  # (d_out, R), (R,), (R, R)
        U_A, S_A, Vh_A = torch.linalg.svd(A_s, full_matrices=False)  # (R, R), (R,), (R, d_in)
        core = (S_B[:, None] * Vh_B) @ (U_A * S_A)  # (R, R)
        P, sig, Qh = torch.linalg.svd(core)
        p = min(numerical_rank(sig, self.rtol), energy_rank(sig, self.threshold, self.energy))
        seed = previous.seed + 1 if isinstance(previous, SpectralState) else self.seed
        return SpectralState(
            (U_B @ P[:, :p]).contiguous(),
            sig[:p].contiguous(),
            (Qh[:p] @ Vh_A).T.contiguous(),
            out_dtype=updates[0].dtype,
            seed=seed,
            restart=True,
        )
