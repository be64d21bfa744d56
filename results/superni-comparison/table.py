"""The comparison's tables from its run folders: unseen and seen ROUGE-L per run, then the
unseen score per category. Usage: python results/superni-comparison/table.py runs/superni-comparison"""

import json
import sys
from pathlib import Path

ORDER = ["zero-shot", "glora", "flexlora", "hetlora", "fedit", "centralized"]


def main(root: Path) -> None:
    done = [n for n in ORDER if (root / n / "summary.json").exists()]
    runs = {n: json.loads((root / n / "summary.json").read_text()) for n in done}
    configs = {n: json.loads((root / n / "config.json").read_text()) for n in runs}
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
