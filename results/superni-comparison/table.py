"""The comparison's tables from its run folders: unseen and seen ROUGE-L per run, then the
unseen score per category. Usage: python results/superni-comparison/table.py runs/superni-comparison,
or a sweep's results folder (results/sweeps/task-heterogeneity), whose run folders are named by
config identity: there each run is named by its rule, and its ranks where the rule comes twice."""

import json
import sys
from pathlib import Path

ORDER = ["zero-shot", "glora", "flexlora", "hetlora", "fedit", "centralized"]


def named_runs(root: Path) -> dict[str, Path]:
    """The finished run folders under ``root`` by display name, in ORDER."""
    folders = [f.parent for f in sorted(root.glob("*/summary.json"))]
    if all(f.name in ORDER for f in folders):
        return {f.name: f for f in sorted(folders, key=lambda f: ORDER.index(f.name))}
    configs = {f: json.loads((f / "config.json").read_text()) for f in folders}
    rules = [c["rule"] for c in configs.values()]
    rank = {f: ORDER.index(c["rule"]) if c["rule"] in ORDER else len(ORDER) for f, c in configs.items()}
    return {
        (c["rule"] if rules.count(c["rule"]) == 1 else f"{c['rule']} (ranks {c['ranks']})"): f
        for f, c in sorted(configs.items(), key=lambda fc: (rank[fc[0]], fc[1]["rule"], fc[1]["ranks"]))
    }


def main(root: Path) -> None:
    folders = named_runs(root)
    runs = {n: json.loads((f / "summary.json").read_text()) for n, f in folders.items()}
    configs = {n: json.loads((f / "config.json").read_text()) for n, f in folders.items()}
    print("| run | ranks | unseen ROUGE-L | seen ROUGE-L | wall (s) | peak RSS (MB) | MiB up (total) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n, s in runs.items():
        f = s["final"]
        cfg = configs[n]
        ranks = cfg["ranks"] if cfg["rounds"] else "-"
        if cfg["rule"] == "centralized":  # one client, the pooled data, at the largest rank
            ranks = f"{max(int(r) for r in cfg['ranks'].split(','))} (pooled)"
        print(
            f"| {n} | {ranks} | {f['rougeL']:.2f} | {f['rougeL_seen']:.2f} | {s['wall_seconds']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {s['bytes_up_total'] / 2**20:.1f} |"
        )
    cats = sorted({k for s in runs.values() for k in s["final"] if k.startswith("category/")})
    print()
    print("| unseen category | " + " | ".join(runs) + " |")
    print("| --- | " + " | ".join("---:" for _ in runs) + " |")
    for c in cats:
        print(f"| {c.removeprefix('category/')} | " + " | ".join(f"{s['final'][c]:.1f}" for s in runs.values()) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
