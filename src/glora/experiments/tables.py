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
    metrics = sorted((summary.get("final_global") or summary.get("final") or {}).keys())
    for m in metrics:
        table.add_column(m, justify="right")
    rows = [("global (full server update)", summary.get("final_global"))]
    rows += [(f"client of rank {r}", v) for r, v in (summary.get("final_by_rank") or {}).items()]
    rows.append(("clients' own models (mean)", summary.get("final_personal")))
    for name, values in rows:
        if values:
            table.add_row(name, *(f"{values[m]:.4f}" for m in metrics))
    console = console or Console()
    console.print(table)
    console.print(
        f"wall {summary['wall_seconds']:.0f} s, peak memory {summary['peak_rss_mb']:.0f} MB, "
        f"sent up {summary['bytes_up_total'] / 2**20:.1f} MiB, down {summary['bytes_down_total'] / 2**20:.1f} MiB, "
        f"server aggregation {summary['server_seconds_total']:.2f} s"
    )
