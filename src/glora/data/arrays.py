"""Per-example values (labels, predictions) handed in as a tensor, list or array."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def as_vector(x: Any, what: str) -> np.ndarray:
    """``x`` as a one-dimensional numpy array; ValueError naming ``what`` otherwise."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional (one value per example); got shape {a.shape}")
    return a
