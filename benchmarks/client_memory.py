"""Peak memory and time of one client's local step on SmolLM2-135M (issue #27): the frozen
base in float32, in bfloat16, and in bfloat16 with activation checkpointing; LoRA rank 16 on
q_proj and v_proj, batch 4 of 256 tokens. Each configuration runs in a fresh process, so its
peak resident memory (the process's high-water mark, loading included) is its own; the model's
share is reported separately as the bytes of its parameters.

    python benchmarks/client_memory.py [--out results/bench/client_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "float32": {"dtype": "float32", "checkpointing": False},
    "bfloat16": {"dtype": "bfloat16", "checkpointing": False},
    "bfloat16 + checkpointing": {"dtype": "bfloat16", "checkpointing": True},
}
BATCH, SEQ, RANK = 4, 256, 16


def one(dtype: str, checkpointing: bool) -> dict:
    import torch

    from glora.federation.client import local_train
    from glora.models.causal import load_causal_lm
    from glora.models.lora import AdaptedModel, LoraSettings
    from glora.models.precision import loading_kwargs

    torch.set_num_threads(1)
    model, _ = load_causal_lm("smollm2", base=loading_kwargs(dtype))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    adapted = AdaptedModel(model, LoraSettings(("q_proj", "v_proj"), head_modules=()), [RANK])
    params = adapted.activate(RANK)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    local_train(adapted.peft, params, [], lambda idx: batch, list(range(BATCH)), 2, BATCH, 1e-4, 1e-4, 0.0, seed=0)
    seconds = (time.perf_counter() - started) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "weights_mb": weights / 2**20,
        "peak_rss_mb": peak,
        "rss_before_step_mb": before,
        "step_growth_mb": peak - before,
        "step_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench/client_memory.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(**CONFIGS[args.one])))
        return
    rows = {}
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True
        ).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": BATCH, "seq": SEQ, "rank": RANK, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
