"""Where a run's model lives: a torch device named by the user, and batches moved to it."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (the first CUDA device when there is one, else the CPU), or any torch
    device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    if name == "auto":
        return torch.device(device_kind(name))
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device name; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this torch build sees no CUDA device; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def device_kind(name: str) -> str:
    """The device type a run configured with ``name`` trains on here ("cpu", "cuda", ...),
    without the checks of ``resolve_device``: a dry run may list CUDA runs on a CPU machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (no copy where they already are)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
