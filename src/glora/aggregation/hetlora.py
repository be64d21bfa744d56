"""HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024, arXiv 2401.06432): zero-pad, weight by data weight
times update norm, truncate; clients self-prune their rank.

Server step (the paper's "sparsity-weighted aggregation", with the data weights under it): pad
every client's B_i (d_out, r_i) with zero columns and A_i (r_i, d_in) with zero rows to the
largest rank r_max, weight client i by p_i = w_i ||Delta_i||_F / sum_j w_j ||Delta_j||_F with
w_i its data weight (the ``weights`` given to ``aggregate``: example counts, or 1 each under
uniform weighting) and Delta_i = s_i B_i A_i, and average the padded factors:
B = sum_i p_i pad(s_i B_i), A = sum_i p_i pad(A_i). A client of rank r gets the leading
r columns of B and rows of A. ||Delta_i||_F^2 = s_i^2 <B_i^T B_i, A_i A_i^T> comes from
two r_i x r_i Gram matrices: no d_out x d_in matrix is formed.

Client step (the paper's "rank self-pruning"; on when ``prune_gamma`` > 0): a client whose
current rank is k adds to its training loss

    prune_gamma * sum over layers of ||B[:, j:k]||_F ||A[j:k]||_F,  j = max(1, floor(prune_ratio * k)),

the size of its trailing k - j components (the paper's lambda is ``prune_gamma``, its decay
factor gamma is ``prune_ratio``). After local training it compares that size (the sum
without ``prune_gamma``) on its trained factors with the size on the adapter it started the
round from: if the trailing components shrank, it drops them and its rank becomes j;
otherwise it stays k. Its upload then has rank j (the zero padding above takes any rank),
and the pruning lasts: every later round it starts from the leading j components of the
readout, the rest of its rank-r peft adapter held at zero (:meth:`HetLoRA.local_penalty`,
:meth:`HetLoRA.pruned_rank` and the training loop's generic hooks). In round 1 the start has
B = 0, a trailing size of 0 that cannot shrink: pruning can begin in round 2.

What we followed, and what we could not check:
- Weights: the paper's sparsity-weighted aggregation (its method section, summarised by its
  Figure 2) weights client k by ||S_k|| / Z, the Frobenius norm of its reconstructed update
  Delta W_k = B_k A_k over Z, their sum: "After padding, aggregate all of the clients' LoRA
  modules with the weights ||S_k^(t)|| / Z^(t) calculated by Delta W_k^(t)" (Figure 2 caption, as
  a third-party summary quotes it; the section's own text and the paper's objective, where
  example counts would enter, could not be read from here). The caption names no example
  counts; the abstract calls the aggregation "data-aware".
- Self-pruning: the paper's text on it could not be read from here (only its abstract and
  summaries, which say that clients prune their own rank during local training). The penalty
  (the product of the trailing factors' norms), the test (smaller after local training than
  at the start), the new rank floor(gamma k) and its persistence over rounds are those of two
  independent public reimplementations found in a code index, which agree on all four. Not
  checked against the paper: whether its penalty is this product or ||B_tail A_tail||_F
  (which the product bounds from above), its values of gamma and lambda (one
  reimplementation uses gamma = 0.99, lambda = 0.01) and any floor on the rank other than 1.

Where we differ from the paper, and why:
- The data weights multiply the norm weights (``data_weighted=True``, the default), so that
  a client's weight means here what it means to every other rule: a client of weight 0 is
  left out instead of being weighted by its update norm alone (which let such a client,
  sending a 100x update, move the aggregate 566x the clean norm: issue #30), and a client's
  example count still counts, the norm weighting on top. With uniform client weights
  (``--weighting uniform``) this is the caption's weighting exactly. ``data_weighted=False``
  is the norm weighting alone, the rule every run recorded before this default changed ran
  (:attr:`HetLoRA.legacy_options`).
- Each client's LoRA scale s_i is folded into its B before padding (the paper's
  B_k A_k has it implicitly), so clients with different scales are weighted and
  averaged by their actual updates; the global adapter carries scale 1 and a readout
  at scale s divides B by s. With equal scales this is the paper's mean of the B's.
- When the weighted norms sum to 0 (round 0: B = 0 everywhere) the p_i are 0/0; the data
  weights are used instead.
- A client whose rank exceeds r_max gets zero columns of B and fresh LoRA rows of A.
- The penalty is on the factors as peft stores them, without the LoRA scale s (a constant
  that ``prune_gamma`` absorbs).
- ``prune_gamma=0``, the default, turns self-pruning off (no penalty, no pruning): that is
  "HetLoRA without self-pruning", the rule every run recorded before this option worked ran.
- A pruned client's download is still counted at its full rank (the loop reads out at the
  client's configured rank), and the Flower server refuses an upload below a node's rank
  (``flower.records.check_update``): self-pruning runs in the simulation only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

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


def kept_components(rank: int, prune_ratio: float) -> int:
    """j = floor(prune_ratio * rank), at least 1: the components a client of this rank keeps
    when it prunes (the rest are its trailing ones; none when j = rank)."""
    # The small epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    return max(1, math.floor(prune_ratio * rank + 1e-9))


def tail_size(B: Tensor, A: Tensor, start: int) -> Tensor:
    """||B[:, start:]||_F ||A[start:]||_F for B (d_out, k), A (k, d_in): the size of the
    components from ``start`` on (0-dim, differentiable; 0 when there are none)."""
    return torch.linalg.vector_norm(B[:, start:]) * torch.linalg.vector_norm(A[start:])


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

    def total(self) -> LowRank:
        return self.adapter

    def delta(self) -> Tensor:
        return self.adapter.delta()


class HetLoRA(Rule):
    """Zero-padding, averaging weighted by data weight times update norm, truncation; any ranks.

    data_weighted: multiply the norm weights by the data weights (default); false weights by
        the update norms alone, as the paper's Figure 2 caption states them.
    prune_gamma: strength of the penalty on a client's trailing rank components (the paper's
        lambda); 0, the default, turns self-pruning off.
    prune_ratio: the fraction of its rank a client keeps when it prunes (the paper's gamma).
    seed: seed of the fresh LoRA rows that pad a readout above the largest client rank.
    """

    name = "hetlora"
    # The option values that runs recorded before a default changed meant by leaving the
    # option out (see RunConfig.from_saved): the norm weights alone.
    legacy_options: ClassVar[dict[str, object]] = {"data_weighted": False}

    def __init__(
        self, data_weighted: bool = True, prune_gamma: float = 0.0, prune_ratio: float = 0.9, seed: int = 0
    ) -> None:
        if not prune_gamma >= 0:
            raise ValueError(f"hetlora: prune_gamma must be >= 0 (0 turns self-pruning off), got {prune_gamma}")
        if not 0 < prune_ratio <= 1:
            raise ValueError(f"hetlora: prune_ratio must be in (0, 1], got {prune_ratio}")
        self.data_weighted, self.seed = data_weighted, seed
        self.prune_gamma, self.prune_ratio = prune_gamma, prune_ratio
        self.prunes = prune_gamma > 0

    def local_penalty(self, factors: Sequence[tuple[Tensor, Tensor]]) -> Tensor | None:
        """prune_gamma times the size of the client's trailing components, summed over layers."""
        if self.prune_gamma == 0:
            return None
        j = kept_components(int(factors[0][0].shape[1]), self.prune_ratio)
        return self.prune_gamma * sum(tail_size(B, A, j) for B, A in factors)

    def pruned_rank(self, start: Mapping[str, LowRank], trained: Mapping[str, LowRank]) -> int:
        """j if local training shrank the trailing components (summed over layers), else k."""
        k = next(iter(trained.values())).rank
        if self.prune_gamma == 0:
            return k
        j = kept_components(k, self.prune_ratio)
        before = sum(float(tail_size(f.B, f.A, j)) for f in start.values())
        after = sum(float(tail_size(f.B, f.A, j)) for f in trained.values())
        return j if after < before else k

    def aggregation_weights(self, updates: list[LowRank], weights: Tensor) -> Tensor:
        """The p_i of the padded average (K,) float64, summing to 1; 0 for a client of data
        weight 0 unless ``data_weighted`` is off."""
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
