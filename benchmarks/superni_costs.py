"""What SuperNI costs on this machine: batched greedy generation and one LoRA training step.

    python benchmarks/superni_costs.py [--backbone smollm2] [--repeats 3]

Generation: a batch of 8 real SuperNI prompts of about 200 tokens, 32 new tokens each
(generation is forced to run all 32 steps, so tokens/s counts every step). Training: one
forward and backward pass of a batch of 4 x 256 tokens with peft LoRA r=8 on q_proj and
v_proj, plus an AdamW step on the adapter. Reports medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from glora.data.superni import SuperNI
from glora.data.superni_prompts import PromptSettings, encode_task
from glora.models.causal import load_causal_lm


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.backbone)
    data = SuperNI()
    settings = PromptSettings(num_examples=2, max_length=256, max_target_length=32)
    prompts = [
        list(x.prompt)
        for task in data.test_tasks
        for x in encode_task(data, task, tokenizer, settings).instances
        if 190 <= len(x.prompt) <= 210
    ][:8]
    batch = torch.full((8, max(map(len, prompts))), tokenizer.pad_token_id)
    mask = torch.zeros_like(batch)
    for r, p in enumerate(prompts):
        batch[r, -len(p) :] = torch.tensor(p)
        mask[r, -len(p) :] = 1

    def gen() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=batch, attention_mask=mask, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                pad_token_id=tokenizer.pad_token_id,
            )

    g = median_seconds(gen, args.repeats)
    print(f"generation: batch 8 x ~{batch.shape[1]} prompt tokens, 32 new: {g:.2f} s, {8 * 32 / g:.0f} new tokens/s")

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, len(tokenizer), (4, 256), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    s = median_seconds(step, args.repeats)
    print(f"LoRA r=8 (q_proj, v_proj) train step: batch 4 x 256: {s:.2f} s, {4 * 256 / s:.0f} tokens/s")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
