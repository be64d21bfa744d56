"""Averaging of trainable parameters that are not LoRA factors (method.md step 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from glora.aggregation.base import normalize_weights, weighted_sum


def average_params(params: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg of named tensors (a classification head, trainable norms): the weighted mean
    of each name over the clients, in each tensor's own dtype. Every client must send the
    same names and shapes; ValueError names the client that does not."""
    w = normalize_weights(weights, len(params))
    names = list(params[0])
    for i, p in enumerate(params):
        if list(p) != names:
            raise ValueError(f"client {i}: parameter names {sorted(p)} differ from client 0's {sorted(names)}")
        for n in names:
            if p[n].shape != params[0][n].shape:
                raise ValueError(
                    f"client {i}: parameter {n!r} has shape {tuple(p[n].shape)}, client 0 has "
                    f"{tuple(params[0][n].shape)}"
                )
            if not bool(torch.isfinite(p[n]).all()):
                raise ValueError(f"client {i}: parameter {n!r} contains NaN or Inf")
    return {n: weighted_sum([p[n] for p in params], w, torch.float64).to(params[0][n].dtype) for n in names}
