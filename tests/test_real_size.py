"""Real-size clients (issue #27) on tiny models and this CPU: a reduced-precision base is
never written into (merges live beside it, exactly), gradient accumulation is the larger
batch, gradient clipping bounds the step, and a bf16 + checkpointing + accumulation run of
merging rules federates end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from glora.federation.checks import check_config
from glora.federation.client import local_train
from glora.federation.config import RunConfig
from glora.federation.simulation import run_federation
from glora.lowrank import LowRank
from glora.models.lora import AdaptedModel, LoraSettings
from tests.test_causal import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = LoraSettings(("q_proj", "v_proj"), head_modules=())


def _ids() -> torch.Tensor:
    return torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_merges_into_a_bf16_base_live_beside_it_and_are_exact():
    model = AdaptedModel(tiny_llama().to(torch.bfloat16).eval(), SETTINGS, [2])
    assert not model.exact_base
    before = {n: m.base_layer.weight.detach().clone() for n, m in model.layers.items()}
    g = torch.Generator().manual_seed(0)
    merges = {
        n: LowRank(0.3 * torch.randn(d_out, 2, generator=g), torch.randn(2, d_in, generator=g), 1.0)
        for n, (d_out, d_in) in model.layer_shapes().items()
    }
    model.add_to_base(merges)
    for n, m in model.layers.items():  # never written into
        assert torch.equal(m.base_layer.weight, before[n])
    offsets = model.base_offsets()
    for n, f in merges.items():
        assert torch.equal(offsets[n], f.delta().float())  # float32, not rounded to bf16
    # The layer's output is its bf16 output plus x @ offset^T computed in float32.
    name, layer = next(iter(model.layers.items()))
    x = torch.randn(3, layer.base_layer.in_features, generator=g).to(torch.bfloat16)
    expected = layer.base_layer.weight.float() @ x.float().T
    got = layer.base_layer(x).float().T
    assert torch.allclose(got, expected + offsets[name] @ x.float().T, atol=0.05)
    # dense_update adds for the duration of the block and leaves the offsets as they were.
    with model.dense_update(dict.fromkeys(merges, torch.ones(1)), 2, {}):
        pass
    assert all(torch.equal(model.base_offsets()[n], offsets[n]) for n in offsets)
    fresh = AdaptedModel(tiny_llama().to(torch.bfloat16).eval(), SETTINGS, [2])
    fresh.set_base_offsets(offsets)
    with torch.no_grad():
        assert torch.equal(fresh.peft(input_ids=_ids()).logits, model.peft(input_ids=_ids()).logits)


def test_a_float32_base_still_takes_merges_in_its_weights():
    model = AdaptedModel(tiny_llama().eval(), SETTINGS, [2])
    assert model.exact_base
    name, layer = next(iter(model.layers.items()))
    delta = torch.full(layer.base_layer.weight.shape, 0.01)
    before = layer.base_layer.weight.detach().clone()
    model.add_to_base({name: delta})
    assert torch.equal(layer.base_layer.weight, before + delta)


def _classifier() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    return model, [p for n, p in model.named_parameters() if "classifier" in n]


def _batch_fn():
    ids = torch.randint(0, 40, (64, 5), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))

    def batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}

    return batch


def _train(batch_size: int, accum: int, max_grad_norm: float | None = None) -> torch.Tensor:
    model, params = _classifier()
    start = torch.cat([p.detach().flatten() for p in params])
    local_train(
        model, params, [], _batch_fn(), np.arange(64), 1, batch_size, 1e-2, 1e-2, 0.0, seed=3,
        grad_accum_steps=accum, max_grad_norm=max_grad_norm,
    )  # fmt: skip
    return torch.cat([p.detach().flatten() for p in params]) - start


def test_accumulation_is_the_larger_batch_and_clipping_bounds_the_step():
    one = _train(16, 1)
    two = _train(8, 2)  # the same 16 examples, as two micro-batches of 8
    assert one.abs().max() > 1e-3
    assert torch.allclose(one, two, atol=1e-6)
    assert not torch.allclose(_train(8, 1), one, atol=1e-4)  # half the batch is another step
    # Clipped to a norm far below AdamW's eps, the first step barely moves the parameters.
    assert _train(16, 1, max_grad_norm=1e-12).abs().max() < 1e-4 * one.abs().max()


def test_bad_precision_options_are_one_error():
    for change, words in (
        ({"dtype": "int8"}, "--dtype 'int8': choose float32, bfloat16, float16"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "exclude each other"),
        ({"load_in_4bit": True, "device": "cpu"}, "needs .*a CUDA GPU"),
        ({"grad_accum_steps": 0}, "--grad-accum-steps must be >= 1"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be a finite number > 0"),
        ({"dtype": "bfloat16", "pooling": "cls"}, "needs --pooling mean"),
    ):
        with pytest.raises(ValueError, match=words):
            check_config(RunConfig(**change))


@pytest.fixture(scope="module")
def tiny_causal_folder(tmp_path_factory) -> Path:
    """The tests' tiny Llama with SmolLM2's tokenizer (their vocabularies match), as a model folder."""
    from glora.models.causal import smollm2_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
@pytest.mark.parametrize("rule", ["glora", "flora", "fedex-lora"])
def test_bf16_checkpointing_and_accumulation_federate_merging_rules(tmp_path, tiny_causal_folder, rule):
    cfg = RunConfig.for_task(
        "instructions",
        dataset=str(ROOT / "examples" / "data" / "instructions.jsonl"),
        prompt_column="instruction",
        input_column="input",
        response_column="output",
        backbone=str(tiny_causal_folder),
        rule=rule,
        clients=2,
        ranks="4",
        rounds=2,
        local_steps=2,
        batch_size=2,
        max_length=64,
        superni_max_target_length=8,
        superni_max_new_tokens=4,
        max_train_examples=40,
        max_eval_examples=4,
        dtype="bfloat16",
        gradient_checkpointing=True,
        grad_accum_steps=2,
        threads=1,
    )
    summary = run_federation(cfg, tmp_path / rule, progress=False)
    assert summary["rounds"] == 2 and np.isfinite(summary["final"]["rougeL"])
    rows = [json.loads(line) for line in (tmp_path / rule / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
