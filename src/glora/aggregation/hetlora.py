"""HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024): zero-pad, weight by update norm, truncate.

Server step (the paper's "sparsity-weighted aggregation"): pad every client's B_i
(d_out, r_i) with zero columns and A_i (r_i, d_in) with zero rows to the largest rank
r_max, weight client i by p_i = ||Delta_i||_F / sum_j ||Delta_j||_F with
Delta_i = s_i B_i A_i, and average the padded factors:
B = sum_i p_i pad(s_i B_i), A = sum_i p_i pad(A_i). A client of rank r gets the leading
r columns of B and rows of A. ||Delta_i||_F^2 = s_i^2 <B_i^T B_i, A_i A_i^T> comes from
two r_i x r_i Gram matrices: no d_out x d_in matrix is formed.

Where we differ from method.md or the paper, and why:
- Weights: the paper weights by the update norms alone, not by example counts; that
  is the default here, so the ``weights`` given to ``aggregate`` are ignored unless
  ``data_weighted=True`` (our option: p_i proportional to w_i ||Delta_i||_F).
- Each client's LoRA scale s_i is folded into its B before padding (the paper's
  B_k A_k has it implicitly), so clients with different scales are weighted and
  averaged by their actual updates; the global adapter carries scale 1 and a readout
  at scale s divides B by s. With equal scales this is the paper's mean of the B's.
- When every update is zero (round 0: B = 0 everywhere) the norm weights are 0/0; the
  data weights are used instead.
- A client whose rank exceeds r_max gets zero columns of B and fresh LoRA rows of A.
- Rank self-pruning is a client-side regulariser (training loop), not a server step:
  the rule carries its settings, ``prune_gamma`` (strength of the penalty on the norm
  of the trailing rank components of the client's update; 0, the default, turns it
  off) and ``prune_ratio`` (the fraction of its rank a client keeps when those trailing
  components shrink), for the training loop to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule
from glora.lowrank import LowRank, lora_init_A


def update_norms(updates: list[LowRank]) -> Tensor:
    """||s_i B_i A_i||_F for each client (K,) float64, from r_i x r_i Gram matrices:
    ||B A||_F^2 = trace(B^T B A A^T). Cost O((d_out + d_in) r_i^2)."""
    norms = []
    for u in updates:
        B, A = u.B.double(), u.A.double()
        sq = float(((B.T @ B) * (A @ A.T)).sum())
        norms.append(abs(u.scale) * max(sq, 0.0) ** 0.5)
    return torch.tensor(norms, dtype=torch.float64)


def pad_columns(M: Tensor, width: int) -> Tensor:
    """M (d, r) with zero columns appended to (d, width)."""
    return torch.cat([M, M.new_zeros(M.shape[0], width - M.shape[1])], dim=1)


@dataclass(frozen=True)
class PaddedState(LayerState):
    """The global padded adapter (rank r_max, scale 1); readouts are its leading rows/columns.

    ``out_dtype`` is the clients' dtype; ``seed`` draws the fresh A rows of a readout
    whose rank exceeds r_max.
    """

    adapter: LowRank
    out_dtype: torch.dtype
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.adapter.shape

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def readout(self, rank: int, scale: float) -> LowRank:
        if rank < 1:
            raise ValueError(f"readout rank must be >= 1, got {rank}")
        if scale <= 0:
            raise ValueError(f"readout scale must be > 0, got {scale}")
        k = min(rank, self.rank)
        B = self.adapter.B[:, :k] * (self.adapter.scale / scale)
        A = self.adapter.A[:k].clone()
        if k < rank:
            g = torch.Generator().manual_seed(self.seed)
            A = torch.cat([A, lora_init_A(rank, self.shape[1], g, A.dtype)[k:]])
            B = pad_columns(B, rank)
        return LowRank(B.to(self.out_dtype), A.to(self.out_dtype), scale)

    def delta(self) -> Tensor:
        return self.adapter.delta()


class HetLoRA(Rule):
    """Zero-padding, update-norm-weighted averaging, truncation; any client ranks.

    data_weighted: multiply the norm weights by the example-count weights (not in the paper).
    prune_gamma, prune_ratio: the client-side rank self-pruning settings (see module doc).
    seed: seed of the fresh LoRA rows that pad a readout above the largest client rank.
    """

    name = "hetlora"

    def __init__(
        self, data_weighted: bool = False, prune_gamma: float = 0.0, prune_ratio: float = 0.9, seed: int = 0
    ) -> None:
        if not prune_gamma >= 0:
            raise ValueError(f"hetlora: prune_gamma must be >= 0 (0 turns self-pruning off), got {prune_gamma}")
        if not 0 < prune_ratio <= 1:
            raise ValueError(f"hetlora: prune_ratio must be in (0, 1], got {prune_ratio}")
        self.data_weighted, self.seed = data_weighted, seed
        self.prune_gamma, self.prune_ratio = prune_gamma, prune_ratio

    def aggregation_weights(self, updates: list[LowRank], weights: Tensor) -> Tensor:
        """The p_i of the padded average (K,) float64, summing to 1."""
        p = update_norms(updates)
        if self.data_weighted:
            p = p * weights
        total = float(p.sum())
        return weights.clone() if total == 0 else p / total

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> PaddedState:
        p = self.aggregation_weights(updates, weights)
        r_max = max(u.rank for u in updates)
        d_out, d_in = updates[0].shape
        B = torch.zeros(d_out, r_max, dtype=torch.float64)
        A = torch.zeros(r_max, d_in, dtype=torch.float64)
        for pi, u in zip(p.tolist(), updates, strict=True):
            B[:, : u.rank].add_(u.B.double(), alpha=pi * u.scale)
            A[: u.rank].add_(u.A.double(), alpha=pi)
        dtype = updates[0].dtype
        return PaddedState(LowRank(B.to(dtype), A.to(dtype), 1.0), out_dtype=dtype, seed=self.seed)
