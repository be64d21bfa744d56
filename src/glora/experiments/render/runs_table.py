"""A markdown table of individual run folders (no sweep needed): each evaluated round's main
metric, per-rank metrics at the end, loss, wall time and traffic, read from the run files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    config = json.loads((folder / "config.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return config, rows, summary


def _main_metric(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str | None:
    if summary:
        return summary["main_metric"]
    for r in rows:
        if "eval" in r:
            return sorted(r["eval"])[0]
    return None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _options(config: dict[str, Any]) -> str:
    """The rule's options and the client-side choices that differ from the first-token head
    and plain cross-entropy (config.json files older than those options have neither key)."""
    out = [f"{k}={v}" for k, v in sorted(config.get("rule_options", {}).items())]
    if config.get("pooling", "cls") != "cls":
        out.append(f"pooling={config['pooling']}")
    if config.get("head_lr") is None and config.get("head_lr_ratio", 1.0) != 1.0:
        out.append(f"head_lr_ratio={config['head_lr_ratio']:g}")
    if config.get("logit_adjustment", 0.0):
        out.append(f"logit_adjustment={config['logit_adjustment']:g}")
    return ", ".join(out)


def runs_markdown(folders: list[Path]) -> str:
    """One row per run folder, in the order given; unfinished runs are marked."""
    lines = [
        "| run | rule | ranks | lr | options | evaluated rounds: metric | final by rank | personal | "
        "last loss | rounds done | wall (s) | MiB up/round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folder in folders:
        if not (folder / "metrics.jsonl").exists():
            continue
        config, rows, summary = _read(folder)
        metric = _main_metric(rows, summary)
        evals = ", ".join(f"r{r['round']}: {r['eval'][metric]:.3f}" for r in rows if "eval" in r) or "-"
        last_eval = next((r for r in reversed(rows) if "eval" in r), {})
        by_rank = ", ".join(
            f"{k}: {v[metric]:.3f}"
            for k, v in sorted(last_eval.get("eval_by_rank", {}).items(), key=lambda kv: int(kv[0]))
        )
        personal = _fmt(last_eval.get("eval_personal", {}).get(metric))
        loss = _fmt(rows[-1]["train_loss"])  # None for a --rounds 0 (zero-shot) run
        wall = summary["wall_seconds"] if summary else sum(r["round_seconds"] for r in rows)
        up = sum(r["bytes_up"] for r in rows) / len(rows) / 2**20
        options = _options(config)
        done = f"{rows[-1]['round']}/{config['rounds']}" + ("" if summary else " (unfinished)")
        lines.append(
            f"| {folder.name} | {config['rule']} | {config['ranks']} | {config['lr']:g} | {options} | {evals} | "
            f"{by_rank or '-'} | {personal} | {loss} | "
            f"{done} | {wall:.0f} | {up:.2f} |"
        )
    return "\n".join(lines) + "\n"
