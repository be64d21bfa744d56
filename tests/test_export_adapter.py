"""The exported adapter of a model whose adapted layers differ in width: a grouped-query
attention model's v_proj (d_out 16) is narrower than the rank its q_proj's update needs
(64), as after FLoRA's merges on SmolLM2. The adapter must still reload in peft and give the
dense update's logits."""

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from glora.models.lora import AdaptedModel, LoraSettings, export_adapter

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,  # v_proj: 64 -> 16
    max_position_embeddings=32,
)


def fresh() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft asks transformers a deprecated question
def test_a_full_rank_update_beside_a_narrow_layer_exports_and_reloads(tmp_path):
    settings = LoraSettings(("q_proj", "v_proj"), head_modules=())
    adapted = AdaptedModel(fresh(), settings, [4])
    shapes = adapted.layer_shapes()
    assert {s for n, s in shapes.items() if n.endswith("v_proj")} == {(16, 64)}
    g = torch.Generator().manual_seed(1)
    updates = {n: 0.02 * torch.randn(d_out, d_in, generator=g) for n, (d_out, d_in) in shapes.items()}
    ids = torch.randint(0, 64, (2, 12), generator=g)
    with adapted.dense_update(updates, 4, {}) as m, torch.no_grad():
        expected = m(input_ids=ids).logits
    rank = export_adapter(tmp_path / "adapter", fresh(), updates, {}, settings)
    assert rank == 64  # q_proj's update is full rank: wider than v_proj's 16 rows
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        base = fresh()(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4)
