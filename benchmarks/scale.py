"""Setup time, round time and peak memory of a federation as the number of clients grows
while the clients sampled a round stay fixed (issue #33): SST-2, MiniLM, N = 10 ... 10,000
clients, 20 of them a round, one local step of batch 8 each (tiny local work, so the
federation's own costs show), the one-pass Dirichlet split (alpha 0.5, at least 5 examples a
client), for a plain rule (GLoRA) and a personalised one (FedSA-LoRA, which keeps every
sampled client's own factors and head). Each (rule, N) runs in a fresh process, so its peak
resident memory is its own; 3 rounds, evaluation on 64 validation sentences at the end only
(the last round's time holds it, and for FedSA-LoRA every personal model's): the table's
round time is the mean of the rounds before.

    python benchmarks/scale.py [--clients 10,100,1000,10000] [--out results/bench]

Writes scale.json (every measurement), scale.md (the table) and scale.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLED, ROUNDS = 20, 3
RULES = ("glora", "fedsa-lora")


def one(rule: str, clients: int) -> dict:
    """One run in this process: setup seconds (data, split, model), each round's seconds,
    peak resident memory."""
    import torch

    from glora.federation.config import RunConfig
    from glora.federation.simulation import Federation

    torch.set_num_threads(1)
    cfg = RunConfig(
        rule=rule,
        clients=clients,
        fraction=min(1.0, SAMPLED / clients),
        partition_scheme="one-pass",
        min_client_examples=5,
        ranks="8",
        rounds=ROUNDS,
        local_steps=1,
        batch_size=8,
        eval_every=ROUNDS,
        max_eval_examples=64,
        eval_ranks=False,
        threads=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(cfg, Path(tmp) / "run", progress=False)
        started = time.perf_counter()
        with fed.session() as st:
            setup = time.perf_counter() - started
            summary = fed.run_rounds(st)
            rows = fed.store.metrics()
    return {
        "rule": rule,
        "clients": clients,
        "sampled": len(rows[0]["clients"]),
        "setup_seconds": setup,
        "round_seconds": [r["round_seconds"] for r in rows],
        "peak_rss_mb": summary["peak_rss_mb"],
    }


def training_round(row: dict) -> float:
    """Mean seconds of the rounds without evaluation."""
    return sum(row["round_seconds"][:-1]) / (len(row["round_seconds"]) - 1)


def table(rows: list[dict]) -> str:
    lines = [
        "| rule | clients | sampled a round | setup s | a round s | last round with evaluation s | peak memory MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['clients']:,} | {r['sampled']} | {r['setup_seconds']:.1f} | {training_round(r):.1f} "
            f"| {r['round_seconds'][-1]:.1f} | {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for rule in RULES:
        mine = [r for r in rows if r["rule"] == rule]
        n = [r["clients"] for r in mine]
        values = (
            [r["setup_seconds"] for r in mine],
            [training_round(r) for r in mine],
            [r["peak_rss_mb"] for r in mine],
        )
        for ax, v in zip(axes, values, strict=True):
            ax.loglog(n, v, marker="o", label=rule)
    for ax, title in zip(axes, ("setup (s)", "a round (s)", "peak memory (MiB)"), strict=True):
        ax.set_xlabel("clients (20 sampled a round)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000,10000", help="Numbers of clients, comma-separated.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "bench")
    parser.add_argument("--one", nargs=2, metavar=("RULE", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    rows = []
    for rule in RULES:
        for n in (int(x) for x in args.clients.split(",")):
            done = subprocess.run(
                [sys.executable, __file__, "--one", rule, str(n)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from glora.federation.results import git_commit

    command, commit = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]), git_commit()
    (args.out / "scale.json").write_text(
        json.dumps({"command": command, "commit": commit, "rows": rows}, indent=2) + "\n"
    )
    (args.out / "scale.md").write_text(f"Made by `{command}` at commit {commit}.\n\n" + table(rows))
    plot(rows, args.out / "scale.png")


if __name__ == "__main__":
    main()
