"""Files sent to a leased GPU machine in parts (tools/parts.py, tools/mpnet_parts.py): the
parts join back to the same bytes, a missing part is named, a corrupted one is refused, and
MPNet's weights come back in float32 as their float16 rounding."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parts = _load("parts")


def test_parts_join_back_to_the_same_bytes(tmp_path):
    blob = bytes(range(256)) * 41  # 10,496 bytes: 11 parts of 1,000, the last one short
    assert parts.write_parts(blob, tmp_path / "out", 1000) == 11
    assert (tmp_path / "out" / "11" / parts.PART).stat().st_size == 496
    assert parts.missing_parts(tmp_path / "out") == []
    parts.join(tmp_path / "out", tmp_path / "whole.bin")
    assert (tmp_path / "whole.bin").read_bytes() == blob


def test_a_missing_part_is_named_and_a_corrupted_one_refused(tmp_path):
    blob = b"x" * 2500
    parts.write_parts(blob, tmp_path / "out", 1000)
    assert parts.missing_parts(tmp_path / "nothing") == [1]
    (tmp_path / "out" / "2" / parts.PART).unlink()
    assert parts.missing_parts(tmp_path / "out") == [2]
    with pytest.raises(ValueError, match=r"parts \[2\] of w.bin are not whole"):
        parts.join(tmp_path / "out", tmp_path / "w.bin")
    (tmp_path / "out" / "2" / parts.PART).write_bytes(b"y" * 1000)  # the right size, other bytes
    with pytest.raises(ValueError, match="do not match their manifest"):
        parts.join(tmp_path / "out", tmp_path / "w.bin")
    assert not (tmp_path / "w.bin").exists()
    with pytest.raises(ValueError, match="part size must be positive"):
        parts.write_parts(blob, tmp_path / "o", 0)


def test_mpnet_weights_come_back_in_float32_as_their_float16_rounding(tmp_path):
    from safetensors.torch import load_file, save_file

    mpnet = _load("mpnet_parts")
    model = tmp_path / "model"
    model.mkdir()
    weights = {"a": torch.randn(64, 33, generator=torch.Generator().manual_seed(0)), "b": torch.randn(7)}
    save_file(weights, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    n = mpnet.split(model, tmp_path / "parts", 4000)
    assert n > 1 and mpnet.missing(tmp_path / "parts") == []
    mpnet.join(tmp_path / "parts", tmp_path / "joined")
    back = load_file(tmp_path / "joined" / "model.safetensors")
    for k, v in weights.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.half().float())
    assert json.loads((tmp_path / "joined" / "config.json").read_text()) == {"model_type": "mpnet"}


def test_a_part_cut_short_is_named_missing_and_a_split_cut_short_has_no_manifest(tmp_path):
    parts.write_parts(b"z" * 2500, tmp_path / "out", 1000)
    part = tmp_path / "out" / "3" / parts.PART
    part.write_bytes(part.read_bytes()[:100])  # a copy interrupted
    assert parts.missing_parts(tmp_path / "out") == [3]
    (tmp_path / "out" / "1" / parts.MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match=r"is not a manifest of parts\.py"):
        parts.missing_parts(tmp_path / "out")
