"""The exported adapter of a model whose adapted layers differ in width: a grouped-query
attention model's v_proj (d_out 8) is narrower than the rank its q_proj's update needs
(16), as after FLoRA's merges on SmolLM2. The adapter must still reload in peft and give the
dense update's logits."""

import pytest
import torch
from peft import PeftModel

from glora.models.lora import AdaptedModel, LoraSettings, export_adapter
from tests.test_causal import tiny_llama  # hidden 16, one key-value head of two: v_proj is 8 wide


def fresh():
    return tiny_llama().eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft asks transformers a deprecated question
def test_a_full_rank_update_beside_a_narrow_layer_exports_and_reloads(tmp_path):
    settings = LoraSettings(("q_proj", "v_proj"), head_modules=())
    adapted = AdaptedModel(fresh(), settings, [4])
    shapes = adapted.layer_shapes()
    assert {s for n, s in shapes.items() if n.endswith("v_proj")} == {(8, 16)}
    g = torch.Generator().manual_seed(1)
    updates = {n: 0.05 * torch.randn(d_out, d_in, generator=g) for n, (d_out, d_in) in shapes.items()}
    ids = torch.randint(0, 64, (2, 12), generator=g)
    with adapted.dense_update(updates, 4, {}) as m, torch.no_grad():
        expected = m(input_ids=ids).logits
    rank = export_adapter(tmp_path / "adapter", fresh(), updates, {}, settings)
    assert rank == 16  # q_proj's update is full rank: wider than v_proj's 8 rows
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        base = fresh()(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4)
