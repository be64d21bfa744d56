"""The mean-pooled classification head (``--pooling mean``): padding-invariant, LoRA goes
into its encoder as usual, and its exported adapter reloads in peft with the same logits."""

import pytest
import torch
from peft import PeftModel

from glora.federation.checks import check_config
from glora.federation.config import RunConfig
from glora.models.backbones import load_classifier
from glora.models.lora import AdaptedModel, LoraSettings, export_adapter
from glora.models.mean_pooled import MeanPooledClassifier

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    model, tokenizer = load_classifier("minilm", 2, seed=0, pooling="mean")
    return model.eval(), tokenizer


def test_logits_are_the_head_on_the_masked_mean_of_the_token_states(minilm):
    model, tok = minilm
    assert isinstance(model, MeanPooledClassifier)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model.encoder(**batch).last_hidden_state
        n = batch["attention_mask"].sum(1, keepdim=True)
        means = torch.stack([states[i, : int(n[i])].mean(0) for i in range(len(SENTENCES))])
        assert torch.allclose(model(**batch).logits, model.classifier(means), atol=1e-5)


def test_padding_does_not_change_the_logits(minilm):
    """The shorter sentence alone and padded next to a longer one: the same logits (an
    unmasked mean, or a mask applied to the wrong axis, would differ)."""
    model, tok = minilm
    with torch.no_grad():
        alone = model(**tok(SENTENCES[:1], return_tensors="pt")).logits
        padded = model(**tok(SENTENCES[:1], padding="max_length", max_length=40, return_tensors="pt")).logits
    assert torch.allclose(alone, padded, atol=1e-5)


def test_loss_is_cross_entropy_or_mse_for_a_regression_head(minilm):
    model, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.loss == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), rel=1e-6)
    reg, _ = load_classifier("minilm", 1, seed=0, pooling="mean")
    with torch.no_grad():
        out = reg.eval()(**batch, labels=torch.tensor([4.0, 1.5]))
    expected = torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([4.0, 1.5]))
    assert out.loss == pytest.approx(expected.item(), rel=1e-6)


def test_exported_adapter_reloads_in_peft_with_the_same_logits(tmp_path, minilm):
    _, tok = minilm
    settings = LoraSettings()
    adapted = AdaptedModel(load_classifier("minilm", 2, seed=0, pooling="mean")[0], settings, [4])
    assert all(n.startswith("encoder.") for n in adapted.layers)
    g = torch.Generator().manual_seed(0)
    updates = {
        n: 0.05 * torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g)
        for n, (d_out, d_in) in adapted.layer_shapes().items()
    }
    head = {k: v + 0.1 for k, v in adapted.get_head(4).items()}
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with adapted.dense_update(updates, 4, head) as m, torch.no_grad():
        expected = m(**batch).logits
    export_adapter(
        tmp_path / "adapter", load_classifier("minilm", 2, seed=0, pooling="mean")[0], updates, head, settings
    )
    loaded = PeftModel.from_pretrained(
        load_classifier("minilm", 2, seed=0, pooling="mean")[0], str(tmp_path / "adapter")
    ).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        plain = load_classifier("minilm", 2, seed=0, pooling="mean")[0].eval()(**batch).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the update and head did change the model


def test_bad_pooling_is_refused_before_training():
    with pytest.raises(ValueError, match="--pooling must be 'cls' or 'mean'"):
        check_config(RunConfig(pooling="max"))
    with pytest.raises(ValueError, match="pooling must be one of cls, mean"):
        load_classifier("minilm", 2, pooling="max")  # the library call refuses it too, before loading
    with pytest.raises(ValueError, match="generates text"):
        check_config(RunConfig.for_task("superni", pooling="mean"))
    assert RunConfig(pooling="cls").identity() != RunConfig(pooling="mean").identity()


def test_an_export_from_the_runs_own_model_equals_one_from_a_fresh_backbone_and_changes_nothing(tmp_path, minilm):
    """A run exports through the model it trained (no second backbone in memory): even with
    merges in its base weights and its own adapters trained, the adapter folder holds the
    same tensors as an export through a freshly loaded backbone, and afterwards the model's
    adapters, heads, base weights and active adapter are as they were."""
    from safetensors.torch import load_file

    settings = LoraSettings()
    adapted = AdaptedModel(load_classifier("minilm", 2, seed=0, pooling="mean")[0], settings, [2, 4])
    g = torch.Generator().manual_seed(1)
    shapes = adapted.layer_shapes()
    lowrank = {
        n: torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g) for n, (d_out, d_in) in shapes.items()
    }
    updates = {n: 0.05 * d for n, d in lowrank.items()}
    adapted.add_to_base({n: 0.01 * d for n, d in lowrank.items()})  # a merging rule's base
    adapted.set_head(4, {k: v - 0.2 for k, v in adapted.get_head(4).items()})
    adapted.activate(4)
    before = (adapted.get_factors(2), adapted.get_factors(4), adapted.get_head(2), adapted.get_head(4))
    base_before = adapted.base_offsets()
    head = {k: v + 0.1 for k, v in adapted.get_head(2).items()}
    rank = export_adapter(tmp_path / "own", adapted, updates, head, settings)
    export_adapter(tmp_path / "fresh", load_classifier("minilm", 2, seed=0, pooling="mean")[0], updates, head, settings)
    assert rank == 3
    own, fresh = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("own", "fresh"))
    assert own.keys() == fresh.keys() and all(torch.equal(own[k], fresh[k]) for k in own)
    assert (tmp_path / "own" / "adapter_config.json").read_text() == (
        tmp_path / "fresh" / "adapter_config.json"
    ).read_text()
    after = (adapted.get_factors(2), adapted.get_factors(4), adapted.get_head(2), adapted.get_head(4))
    for b, a in zip(before[:2], after[:2], strict=True):
        assert all(torch.equal(b[n].B, a[n].B) and torch.equal(b[n].A, a[n].A) for n in b)
    for b, a in zip(before[2:], after[2:], strict=True):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    assert all(torch.equal(base_before[n], d) for n, d in adapted.base_offsets().items())
    assert adapted.peft.active_adapter == "r4" and set(adapted.peft.peft_config) == {"r2", "r4"}
