"""Device names: auto picks what exists, bad names and absent devices get a clear error
before any model is loaded."""

from __future__ import annotations

import pytest
import torch

from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.models.device import resolve_device, to_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_name_is_refused_before_loading():
    with pytest.raises(ValueError, match="not a torch device name"):
        check_config(RunConfig(device="gpu0"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this build sees a CUDA device")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        check_config(RunConfig(device="cuda"))


def test_device_is_not_part_of_a_runs_identity():
    assert RunConfig(device="cpu").identity() == RunConfig(device="auto").identity()


def test_to_device_moves_every_tensor():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2)}
    moved = to_device(batch, torch.device("meta"))
    assert {v.device.type for v in moved.values()} == {"meta"}
    assert moved["input_ids"].shape == (2, 3)
