"""What SuperNI costs on this machine: batched greedy generation and one LoRA training step.

    python benchmarks/superni_costs.py [--backbone smollm2] [--repeats 3] [--threads N]

Generation: a batch of 8 real SuperNI prompts of about 200 tokens, 32 new tokens each
(generation is forced to run all 32 steps, so tokens/s counts every step). Training: one
forward and backward pass of a batch of 4 x 256 tokens with peft LoRA r=8 on q_proj and
v_proj, plus an AdamW step on the adapter. Reports median wall times and the load average,
since on a shared machine other processes skew the numbers (with more torch threads than
free cores, torch's threads wait on each other: --threads 1 is then much faster). With
--threads 1 the process CPU time, also reported, is what a free core would take.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from glora.data.superni import SuperNI
from glora.data.superni_prompts import PromptSettings, encode_task
from glora.models.causal import load_causal_lm


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``fn`` after one warm-up call."""
    fn()  # warm-up: first calls allocate and pick kernels
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

    def gen(new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=batch,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )

    (g, g_cpu), (p, p_cpu) = median_seconds(lambda: gen(32), args.repeats), median_seconds(lambda: gen(1), args.repeats)
    print(
        f"generation: batch 8 x ~{batch.shape[1]} prompt tokens, 32 new: {g:.2f} s wall ({g_cpu:.2f} s CPU), "
        f"{8 * 32 / g:.1f} new tokens/s; prompt pass alone {p:.2f} s ({p_cpu:.2f} s CPU), "
        f"then {(g - p) / 31:.2f} s ({(g_cpu - p_cpu) / 31:.2f} s CPU) a decoding step of 8 tokens"
    )

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, len(tokenizer), (4, 256), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    s, s_cpu = median_seconds(step, args.repeats)
    print(
        f"LoRA r=8 (q_proj, v_proj) train step, batch 4 x 256: {s:.2f} s wall ({s_cpu:.2f} s CPU), "
        f"{4 * 256 / s:.0f} tokens/s"
    )
    print(f"torch threads: {torch.get_num_threads()}, load average (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
