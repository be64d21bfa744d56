"""Batched greedy generation with a causal language model."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``prompts`` (texts or token ids), decoded and stripped, in input order.

    Prompts are sorted by length so that each batch holds similar lengths (little padding),
    left-padded so every row ends where generation starts, and decoded with the KV cache.
    Only the new tokens are decoded; generation stops at the end-of-sequence token or after
    ``max_new_tokens``. Text prompts are tokenised as the tokenizer does by default.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: load the model with glora.models.causal.load_causal_lm")
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    if any(not x for x in ids):
        raise ValueError("an empty prompt: every prompt needs at least one token")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out: list[str] = [""] * len(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                out[i] = text.strip()
    finally:
        model.train(was_training)
    return out
