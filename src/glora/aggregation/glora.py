"""GLoRA: gauge-aware aggregation in a consensus subspace (../shared/design/method.md).

Per layer, all in low-rank form; no (d_out, d_in) matrix is ever built:
1. each client's update in canonical form X_i diag(sig_i) Y_i^T (gauge-invariant);
2. the consensus subspace U: top-R left singular vectors of the stacked
   [sqrt(w_i) X_i] ("projector") or [sqrt(w_i) X_i diag(sig_i)] ("energy");
3. the server core C = sum_i w_i U^T Delta_i (R, d_in), or with ``sides=2`` a second
   basis V from the Y_i and an (R, R) core U^T Delta_i V;
4. the state U C = P_U (sum_i w_i Delta_i);
5. a readout at any rank r is the truncated SVD of U C, nested in r, in the
   "balanced" or "a-normal" gauge, padded with a fresh LoRA A where U C has fewer than
   r non-zero singular values.

This module is the rule: its options, the input checks (those of ``Rule.aggregate``, for
both routes), the server rank policy and which route serves a layer. The mathematics of
both routes, the exact one per layer (``aggregate``) and the Gram one over batches of
layers (``aggregate_layers``), is in glora_batched.py, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from glora.aggregation.base import LayerState, Rule, check_updates, normalize_weights
from glora.aggregation.glora_batched import Options, glora_batch, glora_layer
from glora.aggregation.spectral import ReadoutGauge, SpectralState
from glora.lowrank import DEFAULT_RTOL, LowRank

Consensus = Literal["projector", "energy"]

# Bytes of stacked factors the batched route holds at once (it stacks this many bytes' worth
# of layers per batch): enough layers that the per-call overheads of the small batched
# factorisations vanish, and under glibc's largest mmap threshold (32 MiB), so that the
# buffers are reused from the heap from one batch to the next instead of being mapped,
# page-faulted and unmapped every time.
CHUNK_BYTES = 16 * 2**20


def server_rank_policy(rank: int | str | None) -> Callable[[list[int]], int]:
    """The server rank R as a function of the round's client ranks; ValueError for a bad spec."""
    if rank is None or rank == "max":
        return max
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise ValueError(f"glora: rank must be >= 1, got {rank}")
        return lambda ranks: rank
    if rank == "2max":
        return lambda ranks: 2 * max(ranks)
    if rank == "sum":
        return sum
    if isinstance(rank, str) and rank.startswith("sum<="):
        try:
            cap = int(rank.removeprefix("sum<="))
        except ValueError:
            cap = 0
        if cap >= 1:
            return lambda ranks: min(sum(ranks), cap)
    raise ValueError(f"glora: rank {rank!r}: give an int >= 1, 'max', '2max', 'sum' or 'sum<=N'")


class GLoRA(Rule):
    """Gauge-aware server representation for federated LoRA.

    Options (method.md):
    rank: server rank R: an int, or a policy over the round's client ranks: "max" (the
        largest, method.md's choice and this class's default until the replay of
        results/replay), "2max", "sum", or "sum<=N" (their sum, at most N). Default
        "sum<=64", chosen by the pre-registered replay (results/replay/README.md): with few
        clients the state is the exact weighted mean, with many the top-64 consensus
        directions of it. With ``threshold``, the cap.
    threshold: keep every consensus direction whose eigenvalue of the weighted projector
        average is >= threshold (for "energy", relative to the largest), at most ``rank``.
    consensus: "projector" (agreement) or "energy" (what a dense SVD would rank by).
    sides: 1 (left basis U, core R x d_in) or 2 (also a right basis V, core R x R).
    readout_gauge: "balanced" (sqrt of the singular values on each side) or "a-normal"
        (A's rows orthonormal at the norm of a LoRA init, magnitudes in B).
    memory: weight in [0, 1) of the previous state's subspace in the projector average
        (0: this round's participants only).
    restart: clients merge the state into their base weights and start a fresh adapter
        (merge-and-restart) instead of continuing from the readout (warm start).
    keep_tail: under warm start, add to each client's update the part of the previous state
        its rank-r readout left out (the state's components beyond r), so the round's result
        is the previous state plus the clients' mean progress. Without it (the method as
        published) every round keeps only sum_i w_i trunc_{r_i}(state) of what was there:
        with unequal ranks the state's directions beyond the smallest ranks shrink by the
        low-rank clients' share of the weight each round. The server knows what it sent, so
        this costs no traffic. Not in the paper: an option of this package, off by default.
    dtype: server math dtype (float64 default; float32 is faster).
    rtol: relative tolerance of the numerical ranks.
    seed: seed of the fresh LoRA rows that pad a rank-deficient readout.
    """

    name = "glora"
    # The option values that runs recorded before a default changed meant by leaving the
    # option out (see RunConfig.from_saved): R was the largest client rank.
    legacy_options: ClassVar[dict[str, object]] = {"rank": "max"}

    def __init__(
        self,
        rank: int | str | None = "sum<=64",
        threshold: float | None = None,
        consensus: Consensus = "projector",
        sides: int = 1,
        readout_gauge: ReadoutGauge = "a-normal",
        memory: float = 0.0,
        restart: bool = False,
        keep_tail: bool = False,
        dtype: torch.dtype = torch.float64,
        rtol: float = DEFAULT_RTOL,
        seed: int = 0,
    ) -> None:
        self._policy = server_rank_policy(rank)
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"glora: threshold must be in (0, 1], got {threshold}")
        if consensus not in ("projector", "energy"):
            raise ValueError(f"glora: consensus must be 'projector' or 'energy', got {consensus!r}")
        if sides not in (1, 2):
            raise ValueError(f"glora: sides must be 1 or 2, got {sides}")
        if readout_gauge not in ("balanced", "a-normal"):
            raise ValueError(f"glora: readout_gauge must be 'balanced' or 'a-normal', got {readout_gauge!r}")
        if not 0 <= memory < 1:
            raise ValueError(f"glora: memory must be in [0, 1), got {memory}")
        self.rank, self.threshold, self.consensus, self.sides = rank, threshold, consensus, sides
        if keep_tail and restart:
            raise ValueError("glora: keep_tail needs warm start (clients continue from the readout); drop restart")
        self.readout_gauge, self.memory, self.restart, self.keep_tail = readout_gauge, memory, restart, keep_tail
        self.dtype, self.rtol, self.seed = dtype, rtol, seed

    def _options(self, ranks: Sequence[int]) -> Options:
        """The round's options for the core: R from this round's client ranks."""
        return Options(
            self._policy(list(ranks)), self.threshold, self.consensus == "energy", self.sides, self.rtol, self.memory
        )

    def _aggregate(self, updates: list[LowRank], weights: Tensor, previous: LayerState | None) -> SpectralState:
        updates = self._with_tails(updates, previous)
        prev = previous if isinstance(previous, SpectralState) and self.memory > 0 else None
        opts = self._options([u.rank for u in updates])
        state = glora_layer(updates, weights, opts, self.dtype, None if prev is None else (prev.Ub, prev.lam, prev.Q))
        return self._state(*state, updates)

    def _state(self, Ub: Tensor, lam: Tensor, Q: Tensor, updates: Sequence[LowRank]) -> SpectralState:
        return SpectralState(
            Ub, lam, Q, out_dtype=updates[0].dtype, gauge=self.readout_gauge, seed=self.seed, restart=self.restart
        )

    def aggregate_layers(
        self,
        updates: Mapping[str, Sequence[LowRank]],
        weights: Sequence[float],
        previous: Mapping[str, LayerState] | None = None,
    ) -> dict[str, LayerState]:
        """Aggregate every layer of a model: ``updates[layer][client]``.

        Same states as ``aggregate`` layer by layer (up to rounding, see glora_batched.GRAM_TOL),
        computed on the Gram route in batches of layers that share a shape and the clients'
        ranks, after the same input checks as ``aggregate`` (which raise the same errors).
        Layers the Gram route does not take (a previous state to blend with ``memory``, sum r_i
        above the layer's width, an accuracy gate that fails) go through ``aggregate``.
        """
        previous = previous or {}
        out: dict[str, LayerState | None] = dict.fromkeys(updates)
        batches: dict[tuple, list[str]] = {}
        full: dict[str, list[LowRank]] = {}  # the batched layers' updates, with tails where kept
        for name, ups in updates.items():
            prev = previous.get(name)
            if self.memory > 0 and isinstance(prev, SpectralState):
                out[name] = self.aggregate(ups, weights, prev)  # only the exact route blends in a previous basis
                continue
            # The checks ``aggregate`` runs (the same errors), before the Gram route reads the factors.
            normalize_weights(weights, len(ups))
            check_updates(ups, self.name)
            tailed = self._with_tails(list(ups), prev)
            key = self._batch_key(tailed)
            if key is None:
                out[name] = self.aggregate(ups, weights, prev)
            else:
                full[name] = tailed
                batches.setdefault(key, []).append(name)
        with torch.no_grad():
            for (d_out, d_in, ranks, _), names in batches.items():
                w = normalize_weights(weights, len(ranks))
                opts = self._options(ranks)
                per_layer = sum(ranks) * (d_out + (d_in if self.sides == 2 else 0)) * self.dtype.itemsize
                size = max(1, CHUNK_BYTES // per_layer)
                for start in range(0, len(names), size):
                    chunk = names[start : start + size]
                    results = glora_batch([full[n] for n in chunk], w, opts, self.dtype)
                    for n, res in zip(chunk, results, strict=True):
                        if res is None:
                            out[n] = self.aggregate(updates[n], weights, previous.get(n))
                        else:
                            out[n] = self._state(*res, full[n])
        return out  # type: ignore[return-value]

    def _with_tails(self, updates: list[LowRank], previous: LayerState | None) -> list[LowRank]:
        """With ``keep_tail``: each update (B_i, A_i) of rank r_i extended by the previous
        state's tail beyond r_i, [B_i, B_t] and [A_i; A_t] at the client's scale, so that it
        represents Delta_i + (state - trunc_{r_i}(state)). Otherwise the updates as they are."""
        if not self.keep_tail or not isinstance(previous, SpectralState):
            return updates
        out = []
        for u in updates:
            t = previous.tail(u.rank, u.scale)
            if t is not None:
                u = LowRank(torch.cat([u.B, t.B.to(u.dtype)], 1), torch.cat([u.A, t.A.to(u.dtype)]), u.scale)
            out.append(u)
        return out

    def _batch_key(self, updates: Sequence[LowRank]) -> tuple | None:
        """What a checked layer is batched by, (d_out, d_in, client ranks, client dtype), or None
        where it goes through ``aggregate``: no update at all, or more stacked columns than
        the Gram route saves on."""
        d_out, d_in = updates[0].shape
        ranks = tuple(u.rank for u in updates)
        n = sum(ranks)
        if n == 0 or n > d_out or (self.sides == 2 and n > d_in):
            return None
        return (d_out, d_in, ranks, updates[0].dtype)
