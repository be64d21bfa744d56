"""The generative backbone: converting the packaged SmolLM2 once, loading it, greedy generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from glora.models import causal
from glora.models.causal import load_causal_lm, resolve_causal_lm, smollm2_folder
from glora.models.generate import generate


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    # The GGUF loader is replaced by a tiny model so that only the save-and-rename logic runs.
    monkeypatch.setenv("GLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        smollm2_folder()
    assert list((tmp_path / "backbones").iterdir()) == []  # neither the target nor a temp folder


def test_conversion_writes_a_plain_reloadable_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GLORA_CACHE_DIR", str(tmp_path))
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}  # what the GGUF loader leaves behind
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    folder = smollm2_folder()
    assert folder == tmp_path / "backbones" / causal.SMOLLM2_FOLDER
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert "quantization_config" not in (folder / "config.json").read_text()
    monkeypatch.undo()
    monkeypatch.setenv("GLORA_CACHE_DIR", str(tmp_path))
    reloaded, tokenizer = load_causal_lm("smollm2")  # the folder is used as it is: no second conversion
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_unknown_backbones_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown generative backbone 'smollm3'"):
        resolve_causal_lm("smollm3")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_causal_lm(str(tmp_path))
    assert resolve_causal_lm("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.slow
def test_smollm2_generates_deterministic_batched_greedy_text():
    model, tokenizer = load_causal_lm("smollm2")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    prompts = [
        "The capital of France is",
        "The opposite of hot is",
        "Definition: Say whether the review is positive or negative.\n\n"
        "Now complete the following example -\nInput: I loved every minute of this film.\nOutput:",
    ]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    # Left padding must not change greedy continuations: each prompt alone gives the same text.
    assert batched == one_by_one
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2) == batched
    assert all(batched) and len(set(batched)) == 3
    # A sanity check that the dequantised weights still hold the model's knowledge.
    assert batched[0].lower().startswith("paris") and batched[1].lower().startswith("cold")
    # Only new tokens come back, at most max_new_tokens of them.
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 9 for t in batched)
    assert not any(t.startswith(p[:20]) for t, p in zip(batched, prompts, strict=True))
