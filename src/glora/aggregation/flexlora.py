"""FlexLoRA (Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024): dense mean, one SVD, truncate.

The server forms the dense weighted mean W = sum_i w_i s_i B_i A_i (d_out, d_in), takes
one SVD W = U S V^T, and a client of rank r gets the truncated factors. Following the
reference code, all singular values go into B and A keeps orthonormal rows:
B = U_r S_r / s, A = V_r^T (``SpectralState``'s "a-orthonormal" gauge). The state keeps
every numerically non-zero singular value, so ``delta()`` is W itself; a client whose
rank exceeds W's rank (round 0: W = 0) gets zero columns of B and fresh LoRA rows of A.

This is the dense competitor: memory and time grow with d_out * d_in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule
from glora.aggregation.spectral import ReadoutGauge, SpectralState
from glora.lowrank import DEFAULT_RTOL, LowRank, numerical_rank


def dense_mean(updates: list[LowRank], weights: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_i weights[i] * scale_i * B_i @ A_i as a dense (d_out, d_in) matrix in ``dtype``."""
    out = torch.zeros(updates[0].shape, dtype=dtype)
    for w, u in zip(weights.tolist(), updates, strict=True):
        out.addmm_(u.B.to(dtype) * (w * u.scale), u.A.to(dtype))
    return out


class FlexLoRA(Rule):
    """Dense weighted mean and its truncated SVD; any client ranks.

    readout_gauge: "a-orthonormal" (the reference code: magnitudes in B) or another
        ``SpectralState`` gauge as an ablation.
    dtype: server math dtype (float64 default).
    rtol: relative tolerance of W's numerical rank.
    seed: seed of the fresh LoRA rows that pad a rank-deficient readout.
    """

    name = "flexlora"

    def __init__(
        self,
        readout_gauge: ReadoutGauge = "a-orthonormal",
        dtype: torch.dtype = torch.float64,
        rtol: float = DEFAULT_RTOL,
        seed: int = 0,
    ) -> None:
        if readout_gauge not in ("balanced", "a-normal", "a-orthonormal"):
            raise ValueError(
                f"flexlora: readout_gauge must be 'a-orthonormal', 'a-normal' or 'balanced', got {readout_gauge!r}"
            )
        self.readout_gauge, self.dtype, self.rtol, self.seed = readout_gauge, dtype, rtol, seed

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> SpectralState:
        U, S, Vh = torch.linalg.svd(dense_mean(updates, weights, self.dtype), full_matrices=False)
        keep = numerical_rank(S, self.rtol)
        return SpectralState(
            U[:, :keep].contiguous(),
            S[:keep].contiguous(),
            Vh[:keep].T.contiguous(),
            out_dtype=updates[0].dtype,
            gauge=self.readout_gauge,
            seed=self.seed,
        )
