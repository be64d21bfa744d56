"""LoRA goes where a backbone has the layers: each packaged preset's target modules exist in
its backbone, and a miss names the layers that do."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModel, MPNetConfig

from glora.experiments.grid.preset import expand, load_preset, packaged_presets
from glora.models.backbones import resolve_backbone
from glora.models.causal import resolve_causal_lm
from glora.models.lora import AdaptedModel, LoraSettings


@pytest.mark.parametrize("name", packaged_presets())
def test_packaged_presets_put_lora_on_layers_their_backbone_has(name):
    """Every (backbone, target modules) of a preset's runs finds its layers: the architecture
    built from the backbone's config with one layer, no weights. MPNet names its projections
    q/v, BERT query/value, so one default for both fails (the next test shows how)."""
    pairs = {(r.config.task, r.config.backbone, r.config.target_modules) for r in expand(load_preset(name))}
    for task, backbone, targets in pairs:
        folder = resolve_causal_lm(backbone) if task == "superni" else resolve_backbone(backbone)
        config = AutoConfig.from_pretrained(folder)
        config.num_hidden_layers = 1
        adapted = AdaptedModel(AutoModel.from_config(config), LoraSettings(targets, head_modules=()), [2])
        assert {n.rsplit(".", 1)[-1] for n in adapted.layers} == set(targets)


def test_lora_on_missing_layers_names_the_layers_the_backbone_has():
    mpnet = MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match=r"named \['dense', 'k', 'o', 'q', 'v'\].* e\.g\. q,v$"):
        AdaptedModel(AutoModel.from_config(mpnet), LoraSettings(("query", "value"), head_modules=()), [2])
