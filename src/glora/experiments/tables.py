"""Rich tables of run results for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict[str, Any], folder: Path, console: Console | None = None) -> None:
    """The end-of-run table: final metrics (global, per client rank, personal) and costs."""
    table = Table(title=f"{summary['rule']} on {summary['task']}: {summary['rounds']} rounds  ({folder})")
    table.add_column("model")
    # Headline metrics only; "group/name" keys (SuperNI's per-task and per-category scores)
    # would make hundreds of columns, so categories get a table of their own below.
    everything = sorted((summary.get("final_global") or summary.get("final") or {}).keys())
    metrics = [m for m in everything if "/" not in m]
    for m in metrics:
        table.add_column(m, justify="right")
    rows = [("global (full server update)", summary.get("final_global"))]
    rows += [(f"client of rank {r}", v) for r, v in (summary.get("final_by_rank") or {}).items()]
    rows.append(("clients' own models (mean)", summary.get("final_personal")))
    rows = [(name, values) for name, values in rows if values]
    for name, values in rows:
        table.add_row(name, *(f"{values[m]:.4f}" for m in metrics))
    console = console or Console()
    console.print(table)
    categories = [m for m in everything if m.startswith("category/")]
    if categories:
        by_category = Table(title="unseen tasks by category")
        by_category.add_column("category")
        for name, _ in rows:
            by_category.add_column(name, justify="right")
        for c in categories:
            by_category.add_row(c.removeprefix("category/"), *(f"{values[c]:.4f}" for _, values in rows))
        console.print(by_category)
    skipped = {
        m.removeprefix("skipped/"): v for m, v in (rows[0][1] if rows else {}).items() if m.startswith("skipped/")
    }
    if skipped:
        console.print(
            "inputs longer than the prompt budget, skipped: " + ", ".join(f"{k} {v:.0f}" for k, v in skipped.items())
        )
    console.print(
        f"wall {summary['wall_seconds']:.0f} s, peak memory {summary['peak_rss_mb']:.0f} MB, "
        f"sent up {summary['bytes_up_total'] / 2**20:.1f} MiB, down {summary['bytes_down_total'] / 2**20:.1f} MiB, "
        f"server aggregation {summary['server_seconds_total']:.2f} s"
    )
