"""The SuperNI comparison's tables from its run folders: unseen and seen ROUGE-L per run, then
the unseen score per category. Usage: python benchmarks/probes/superni_table.py
results/superni-comparison/runs, or a sweep's results folder (results/sweeps/task-heterogeneity),
whose run folders are named by config identity: there each run is named by its rule, and its
ranks where the rule comes twice. The run folders are only read (open_run)."""

import sys
from pathlib import Path

from glora.federation.results import SavedRun, open_run

ORDER = ["zero-shot", "glora", "flexlora", "hetlora", "fedit", "centralized"]


def named_runs(root: Path) -> dict[str, SavedRun]:
    """The finished runs under ``root`` by display name, in ORDER."""
    runs = [open_run(f.parent) for f in sorted(root.glob("*/summary.json"))]
    if all(r.folder.name in ORDER for r in runs):
        return {r.folder.name: r for r in sorted(runs, key=lambda r: ORDER.index(r.folder.name))}
    rules = [r.config.rule for r in runs]
    rank = {r.folder: ORDER.index(r.config.rule) if r.config.rule in ORDER else len(ORDER) for r in runs}
    return {
        (r.config.rule if rules.count(r.config.rule) == 1 else f"{r.config.rule} (ranks {r.config.ranks})"): r
        for r in sorted(runs, key=lambda r: (rank[r.folder], r.config.rule, r.config.ranks))
    }


def main(root: Path) -> None:
    runs = named_runs(root)
    print("| run | ranks | unseen ROUGE-L | seen ROUGE-L | wall (s) | peak RSS (MB) | MiB up (total) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n, run in runs.items():
        s, cfg = run.summary, run.config
        f = s["final"]
        ranks = cfg.ranks if cfg.rounds else "-"
        if cfg.rule == "centralized":  # one client, the pooled data, at the largest rank
            ranks = f"{max(int(r) for r in cfg.ranks.split(','))} (pooled)"
        print(
            f"| {n} | {ranks} | {f['rougeL']:.2f} | {f['rougeL_seen']:.2f} | {s['wall_seconds']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {s['bytes_up_total'] / 2**20:.1f} |"
        )
    summaries = {n: run.summary for n, run in runs.items()}
    cats = sorted({k for s in summaries.values() for k in s["final"] if k.startswith("category/")})
    print()
    print("| unseen category | " + " | ".join(summaries) + " |")
    print("| --- | " + " | ".join("---:" for _ in summaries) + " |")
    for c in cats:
        print(
            f"| {c.removeprefix('category/')} | "
            + " | ".join(f"{s['final'][c]:.1f}" for s in summaries.values())
            + " |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
