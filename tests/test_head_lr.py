"""The classification head's learning rate: lr x head_lr_ratio unless head_lr is given, and
the presets that pin the old ratio keep the identities of the runs they recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from glora.experiments.grid.preset import expand, load_preset
from glora.federation.checks import check_config
from glora.federation.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_head_lr_is_the_ratio_times_lr_unless_given():
    cfg = RunConfig(lr=5e-4, head_lr_ratio=10.0)
    assert cfg.effective_head_lr() == pytest.approx(5e-3)
    assert cfg.replace(lr=1e-3).effective_head_lr() == pytest.approx(1e-2)  # the ratio follows a tuned lr
    assert cfg.replace(head_lr=1e-4).effective_head_lr() == 1e-4  # an explicit rate wins
    assert RunConfig.for_task("superni").head_lr_ratio == 1.0  # no head there: the inert value
    with pytest.raises(ValueError, match="head-lr-ratio must be a finite number > 0"):
        check_config(RunConfig(head_lr_ratio=0.0))
    with pytest.raises(ValueError, match="head-lr must be a finite number > 0"):
        check_config(RunConfig(head_lr=-1e-3))


def test_setting_one_preset_still_names_its_recorded_runs():
    """Every run folder committed under results/sweeps/data-heterogeneity is a run the preset
    plans today (so a sweep skips it): new fields kept out of the identity at their old value."""
    recorded = {p.name for p in (ROOT / "results/sweeps/data-heterogeneity").iterdir() if (p / "config.json").exists()}
    assert len(recorded) >= 74
    planned = {r.identity for r in expand(load_preset("data-heterogeneity"))}
    assert recorded <= planned
