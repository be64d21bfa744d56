"""The GPU check of issue #27: a 1B-class causal model on one GPU, its frozen base in
bfloat16 and in 4-bit NF4 (QLoRA's setting), measured two ways:

1. one client's local step (LoRA rank 16 on q_proj and v_proj, batch 4 x 1,024 tokens,
   gradient checkpointing): median step time and peak GPU memory;
2. a short federated SuperNI run with ``glora run``'s own code (4 clients of one training
   task each, 1 round of 5 local steps, GLoRA): ROUGE-L on unseen tasks, wall time, peak
   GPU memory.

The leased GPU machine reaches no hub, and no 1B checkpoint fits what it can be sent, so the
model is a Llama built with Llama-3.2-1B's shape (hidden 2,048, 16 layers, 32 heads, 8
key-value heads, MLP 8,192; 1.07 B parameters with SmolLM2's vocabulary of 49,152) and
*random weights*: its times and memory are a 1B model's, its ROUGE-L only shows that the
pipeline runs end to end (near 0). ``--backbone`` takes a real model folder or hub id where
one is at hand. ``--tiny`` runs the same code on this CPU with a tiny Llama (the test).

    bash benchmarks/gpu_check.sh                      # on the GPU machine (see the script)
    python benchmarks/gpu_check.py --tiny --out DIR   # the same path on a CPU, in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = {  # Llama-3.2-1B's shape
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
TINY["num_key_value_heads"] = 1
# Four training tasks (one a client) and four unseen test tasks, each of another category
# (splits/task_categories.tsv): the smallest files of the data directory, to travel light.
TRAIN_TASKS = (
    "task062_bigbench_repeat_copy_logic",
    "task628_xlwic_word_with_different_meaning_sentence_generation",
    "task1191_food_veg_nonveg",
    "task859_prost_question_generation",
)
TEST_TASKS = (
    "task1155_bard_analogical_reasoning_trash_or_treasure",
    "task640_esnli_classification",
    "task121_zest_text_modification",
    "task392_inverse_causal_relationship",
)
PRECISIONS = {
    "bfloat16": {"dtype": "bfloat16"},
    "4bit": {"dtype": "bfloat16", "load_in_4bit": True},
    "float32": {"dtype": "float32"},
}


def build_backbone(folder: Path, tokenizer: str, shape: dict) -> Path:
    """A randomly initialised Llama of ``shape`` with ``tokenizer``'s vocabulary, saved as a
    model folder (bfloat16 weights) with that tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's high-water mark


def reset_peak(device: str) -> None:
    """Free what earlier measurements left and start the peak afresh (each row's own)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def local_steps(backbone: str, precision: dict, device: str, batch: int, seq: int, steps: int) -> dict:
    """Median time and peak memory of one client's local step (LoRA rank 16, checkpointing)."""
    from glora.federation.client import local_train
    from glora.models.causal import load_causal_lm
    from glora.models.lora import AdaptedModel, LoraSettings
    from glora.models.precision import loading_kwargs

    reset_peak(device)
    base = loading_kwargs(precision["dtype"], precision.get("load_in_4bit", False))
    if device.startswith("cuda"):
        base["device_map"] = {"": device}
    model, _ = load_causal_lm(backbone, base=base)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    adapted = AdaptedModel(model, LoraSettings(("q_proj", "v_proj"), head_modules=()), [16])
    params = adapted.activate(16)
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        local_train(adapted.peft, params, [], lambda idx: data, list(range(batch)), 1, batch, 1e-4, 1e-4, 0.0, seed=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {
        "step_seconds_median": statistics.median(times[1:] or times),  # the first step warms up kernels
        "step_seconds": times,
        "peak_memory_mb": peak_memory_mb(device),
        "weights_mb": weights / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    del adapted, model
    return out


def federated_run(backbone: str, precision: dict, device: str, folder: Path, tiny: bool) -> dict:
    """A short federated SuperNI run with glora's own loop; its ROUGE-L, time and memory."""
    from glora.federation.config import RunConfig
    from glora.federation.simulation import run_federation

    reset_peak(device)
    shutil.rmtree(folder, ignore_errors=True)  # a rerun on the same machine measures afresh
    cfg = RunConfig.for_task(
        "superni",
        backbone=backbone,
        device=device,
        gradient_checkpointing=True,
        rule="glora",
        clients=4,
        ranks="16",
        rounds=1,
        local_steps=2 if tiny else 5,
        batch_size=2 if tiny else 4,
        max_length=128 if tiny else 1024,
        superni_train_tasks=",".join(TRAIN_TASKS),
        superni_test_tasks=",".join(TEST_TASKS),
        superni_eval_tasks=len(TEST_TASKS),
        superni_eval_instances=2 if tiny else 10,
        superni_seen_instances=0,
        superni_max_new_tokens=4 if tiny else 32,
        threads=1 if tiny else 8,
        **precision,
    )
    summary = run_federation(cfg, folder, progress=False)
    return {
        "rougeL": summary["final"]["rougeL"],
        "wall_seconds": summary["wall_seconds"],
        "peak_memory_mb": peak_memory_mb(device),
        "run_folder": str(folder),
    }


def commit() -> str:
    """The commit of this code: git's, or what gpu_check.sh --prepare wrote where the copy
    has no .git or the machine no git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    stamp = ROOT / ".gpu-check" / "COMMIT"
    return out or (stamp.read_text().strip() if stamp.exists() else "unknown")


def machine(device: str) -> dict:
    out = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.json/.md and the run folders.")
    parser.add_argument("--backbone", help="A causal model folder or hub id (default: the random 1B-shaped Llama).")
    parser.add_argument("--tokenizer", default="smollm2", help="The built model's tokenizer (a folder or smollm2).")
    parser.add_argument("--precisions", default="bfloat16,4bit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="A tiny Llama and tiny sizes: the check's code on a CPU.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer == "smollm2":
        from glora.models.causal import smollm2_folder

        tokenizer = str(smollm2_folder())
    backbone = args.backbone or str(build_backbone(args.out / "backbone", tokenizer, TINY if args.tiny else LLAMA_1B))
    batch, seq, steps = (2, 32, 2) if args.tiny else (4, 1024, 6)
    result = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit(),
        "machine": machine(args.device),
        "backbone": backbone if args.backbone else f"random Llama, shape {TINY if args.tiny else LLAMA_1B}",
        "local_step": {"batch": batch, "sequence": seq, "rank": 16, "checkpointing": True},
        "precisions": {},
    }
    for name in args.precisions.split(","):
        precision, row = PRECISIONS[name], {}
        result["precisions"][name] = row
        # Each measurement on its own: one that fails (4-bit where bitsandbytes cannot run, a
        # library version's error) is recorded as such and keeps what the others measured.
        for part, measure, more in (
            ("local_step", local_steps, (batch, seq, steps)),
            ("federated", federated_run, (args.out / f"run-{name}", args.tiny)),
        ):
            try:
                row[part] = measure(backbone, precision, args.device, *more)
            except Exception as e:
                row[part] = {"error": f"{type(e).__name__}: {e}"}
            print(name, part, json.dumps(row[part])[:400], flush=True)
            write_report(args.out, result, args.device)
    return result


def write_report(out: Path, result: dict, device: str) -> None:
    """gpu_check.json and the table gpu_check.md, rewritten after every measurement."""
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU check ({result['machine'].get('gpu', device)}, commit {result['commit'][:7]})",
        "",
        f"Backbone: {result['backbone']}. `{result['command']}`",
        "",
        "| base | step s (median) | step peak MB | weights MB | federated ROUGE-L | federated s | federated peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["precisions"].items():
        s, f = r.get("local_step", {}), r.get("federated", {})
        step = (
            f"error: {s['error'][:100]} | | "
            if "error" in s
            else f"{s['step_seconds_median']:.3f} | {s['peak_memory_mb']:.0f} | {s['weights_mb']:.0f}"
            if s
            else " | | "
        )
        fed = (
            f"error: {f['error'][:100]} | | "
            if "error" in f
            else f"{f['rougeL']:.2f} | {f['wall_seconds']:.1f} | {f['peak_memory_mb']:.0f}"
            if f
            else " | | "
        )
        lines.append(f"| {name} | {step} | {fed} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
