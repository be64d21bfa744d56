"""What a train message costs a Flower deployment node beyond its training (issue #27): a
loopback deployment (a SuperLink and 2 SuperNodes on this machine, MiniLM, SST-2), run once
with plain nodes, whose every message starts a fresh ClientApp process that imports torch,
transformers and peft and loads the task and the backbone, and once with a `glora
node-worker` beside each node, which keeps them loaded across messages.

A round's client phase is its ``round_seconds`` less its ``server_seconds`` (metrics.jsonl;
no evaluation before the last round); a message's training is what a worker logs as
"answered in" (the same computation in both modes). Per-message overhead = client phase -
training, the median over rounds 2 to R-1 (round 1 of a worker also loads the model, round R
evaluates). Both modes
include Flower's own transport and polling, which neither can remove.

    python benchmarks/flower_messages.py [--rounds 6] [--out results/bench/flower_messages.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from glora.federation.config import RunConfig
from glora.flower.config import FlowerOptions, run_config_overrides, to_run_config
from glora.flower.loopback import (
    Processes,
    free_port,
    start_node_worker,
    start_superlink,
    start_supernode,
    write_connection,
)

ROOT = Path(__file__).resolve().parents[1]


def config(rounds: int) -> RunConfig:
    return RunConfig(
        task="sst2",
        rule="glora",
        clients=2,
        ranks="4",
        rounds=rounds,
        local_steps=3,
        batch_size=16,
        eval_every=rounds,
        max_train_examples=400,
        max_eval_examples=32,
        threads=1,
    )


def deployment(folder: Path, rounds: int, workers: bool, timeout: float) -> dict:
    """One loopback run; its rounds' client phases and (with workers) the messages' training."""
    procs = Processes(folder, cache=Path(tempfile.gettempdir()) / "glora-bench-cache")
    link = free_port()
    write_connection(folder, "loop", link)
    overrides = to_run_config(config(rounds), FlowerOptions(str(folder / "out"), 600.0, 300.0))
    try:
        start_superlink(procs, link)
        for pid in (0, 1):
            node_config = f"partition-id={pid} num-partitions=2"
            if workers:
                sock = folder / f"worker{pid}.sock"
                start_node_worker(procs, f"worker{pid}", sock)
                node_config += f" worker='{sock}'"
            start_supernode(procs, f"supernode{pid}", link, node_config, "--insecure")
        run = procs.start(
            "flwr-run", ["flwr", "run", str(ROOT), "loop", "--stream", "-c", run_config_overrides(overrides)], "cli"
        )
        run.wait(timeout=timeout)
    finally:
        procs.stop()
    if not (folder / "out" / "summary.json").exists():
        raise RuntimeError(f"the run did not finish: see {folder}/flwr-run.log")
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    phases = [r["round_seconds"] - r["server_seconds"] for r in rows if r["round"] < rounds]
    # Each worker's messages in order, the first of which also loaded the model.
    answered = [
        [float(x) for x in re.findall(r"answered in ([0-9.]+) s", log.read_text())]
        for pid in (0, 1)
        if (log := folder / f"worker{pid}.log").exists()
    ]
    return {"client_phase_seconds": phases, "training_seconds": answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "flower_messages.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
        for mode in ("plain", "worker"):
            folder = Path(tmp) / mode
            folder.mkdir()
            runs[mode] = deployment(folder, args.rounds, mode == "worker", args.timeout)
    training = statistics.median(t for per_node in runs["worker"]["training_seconds"] for t in per_node[1:])
    result = {
        "command": " ".join(["python", "benchmarks/flower_messages.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "config": config(args.rounds).to_dict(),
        "runs": runs,
        "median_training_seconds": training,
    }
    for mode, r in runs.items():
        phase = statistics.median(r["client_phase_seconds"][1:])
        result[f"{mode}_median_client_phase_seconds"] = phase
        result[f"{mode}_overhead_per_message_seconds"] = phase - training
        print(f"{mode}: client phase {phase:.2f} s a round (median, rounds 2..R-1), overhead {phase - training:.2f} s")
    print(f"training of a message: {training:.2f} s (median, a worker's log)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
