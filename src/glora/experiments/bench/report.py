"""Tables and plots of the aggregation benchmark (``glora bench``) from its raw numbers: what
aggregation.md says is rendered here, so it can be re-made from aggregation.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MIB = 2**20
REFERENCE = "glora"  # the rule the other times are compared with
STYLES = {  # the lines the plots are about stand out; every other rule gets a tab10 colour
    "floor": {"color": "black", "ls": "--", "lw": 1.5},
    "glora": {"color": "crimson", "lw": 2.5},
    "glora-f32": {"color": "crimson", "ls": ":", "lw": 2.0},
}


def write_report(data: dict[str, Any], out: Path, headline: str) -> list[Path]:
    """aggregation.json (raw), aggregation.md (tables) and the log-log plots, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "aggregation.json", out / "aggregation.md"]
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    plots = [plot(data["results"], "d", out / "scaling_d.png"), plot(data["results"], "K", out / "scaling_K.png")]
    paths[1].write_text(markdown(data, headline, [p.name for p in plots if p is not None]))
    return paths + [p for p in plots if p is not None]


def _by_case(results: list[dict]) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = {}
    for r in results:
        cases.setdefault(r["case"], {})[r["rule"]] = r
    return cases


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or a.get("seconds") is None or b.get("seconds") is None or b["seconds"] <= 0:
        return None
    return a["seconds"] / b["seconds"]


def _status(r: dict) -> str:
    if r["status"] == "measured":
        return f"measured, {r['runs']} run{'s' if r['runs'] > 1 else ''}"
    return f"{r['status']}: {r.get('note', '')}" if r["status"] in ("skipped",) else r.get("note", r["status"])


def _seconds(r: dict) -> str:
    if r.get("seconds") is None:
        return "-"
    prefix = {"time cap": "> ", "extrapolated": "~", "refused": "~"}.get(r["status"], "")
    return f"{prefix}{r['seconds']:.3g}"


def _x(v: float | None, bound: bool = False) -> str:
    return "-" if v is None else f"{'>' if bound else ''}{v:.3g}"


def _mib(v: float | None, approx: bool = False) -> str:
    return "-" if v is None else f"{'~' if approx else ''}{v / MIB:.4g}"


def case_table(rows: dict[str, dict]) -> str:
    floor, ref = rows.get("floor"), rows.get(REFERENCE)
    lines = [
        "| rule | time (s) | x floor | x glora | peak extra memory (MiB) | x received | up / client (MiB) "
        "| down / client (MiB) | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in rows.items():
        capped = r["status"] == "time cap"
        approx = r["status"] in ("extrapolated", "refused")
        received = r.get("received_bytes")
        mem_x = r["peak_bytes"] / received if r.get("peak_bytes") is not None and received else None
        lines.append(
            f"| {name} | {_seconds(r)} | {_x(_ratio(r, floor), capped)} | "
            f"{_x(_ratio(r, ref), capped) if name != REFERENCE else '1'} | "
            f"{_mib(r.get('peak_bytes'), approx)} | {_x(mem_x)} | {_mib(r.get('up_bytes'))} | "
            f"{_mib(r.get('down_bytes'))} | {_status(r)} |"
        )
    return "\n".join(lines)


def headline_table(rows: dict[str, dict]) -> str:
    floor, flex = rows.get("floor"), rows.get("flexlora")
    lines = ["| | glora (float64, default) | glora-f32 |", "| --- | ---: | ---: |"]
    cols = [rows.get("glora"), rows.get("glora-f32")]

    def row(label: str, fn) -> str:
        return f"| {label} | " + " | ".join(fn(c) if c else "-" for c in cols) + " |"

    flex_bound = flex is not None and flex["status"] == "time cap"
    approx = "~" if flex is not None and flex["status"] == "extrapolated" else ""
    lines += [
        row("round time (s)", lambda c: _seconds(c)),
        row(
            f"FlexLoRA's time / this (target >= 100; FlexLoRA {_seconds(flex) if flex else '-'} s, "
            f"{flex['status'] if flex else 'missing'})",
            lambda c: approx + _x(_ratio(flex, c), flex_bound),
        ),
        row(
            f"this / floor (target <= 10; floor {_seconds(floor) if floor else '-'} s)", lambda c: _x(_ratio(c, floor))
        ),
        row(
            "peak extra memory / client factors received (target <= 2)",
            lambda c: _x(c["peak_bytes"] / c["received_bytes"]) if c.get("peak_bytes") is not None else "-",
        ),
    ]
    return "\n".join(lines)


def markdown(data: dict[str, Any], headline: str, plots: list[str]) -> str:
    meta, cases = data["meta"], _by_case(data["results"])
    m = meta["machine"]
    parts = [
        "# Server cost of the aggregation rules",
        "",
        f"Made by `{meta['command']}` at commit {meta['commit']} on {meta['date']}: torch {m['torch']} with "
        f"`torch.set_num_threads({meta['threads']})` and `OMP_WAIT_POLICY={meta['omp_wait_policy']}`, "
        f"on {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB); the whole run took "
        f"{meta['total_seconds']:.0f} s. Raw numbers: `aggregation.json`. What is measured and how: the "
        "docstring of `benchmarks/aggregation.py`.",
        "",
        f"## {headline} (the targets of issue 5)",
        "",
        headline_table(cases[headline]) if headline in cases else "(not in this run)",
        "",
        "## Reading the tables",
        "",
        f"- time: median of up to {meta['repeats']} warm rounds (as many as fit in {meta['budget_s']:g} s) after "
        f"a cold one; a cold round slower than {meta['slow_s']:g} s is reported alone (runs = 1); x floor, "
        "x glora: the same time divided by the floor's and by GLoRA's "
        "(default options, float64 server math).",
        "- floor: a plain weighted sum of every client factor, read once: no rule can do less.",
        "- `~`: extrapolated from one layer of each shape times the layer count (a whole model whose "
        f"round that predicts above the {meta['cap_s']:g} s cap); `>`: a lower bound (a round stopped at "
        f"the cap; a whole model's layer samples get {meta['sample_cap_s']:g} s).",
        "- peak extra memory: the process's resident peak during the cold round, above its resident memory "
        "before it (the inputs); x received: that peak over the bytes of the factors the rule receives.",
        "- up / down: mean bytes per client (down: merges plus readout factors the plan exchanges; a fresh "
        "seeded adapter costs nothing).",
        "",
    ]
    parts += [f"![{p}]({p})" for p in plots] + [""]
    for name, rows in cases.items():
        parts += [f"### {name}", "", case_table(rows), ""]
    return "\n".join(parts)


def plot(results: list[dict], group: str, path: Path) -> Path | None:
    """Time and peak memory against d (square layers) or K, per rule, equal and unequal ranks."""
    rows = [r for r in results if r["group"] == group and r.get("seconds") is not None]
    if group == "d":
        rows = [r for r in rows if r["shapes"][0][1] == r["shapes"][0][2]]
    if not rows:
        return None
    x_of = (lambda r: r["shapes"][0][1]) if group == "d" else (lambda r: r["clients"])
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    others = iter(plt.get_cmap("tab10").colors * 2)
    style = {name: STYLES.get(name, {"color": next(others), "lw": 1.2}) for name in rules}
    handles = {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for col, equal in enumerate((True, False)):
        for name in rules:
            pts = sorted((x_of(r), r) for r in rows if r["rule"] == name and (len(set(r["ranks"])) == 1) == equal)
            for row, key in enumerate(("seconds", "peak_bytes")):
                ax = axes[row, col]
                good = [
                    (x, r[key] / (MIB if key == "peak_bytes" else 1))
                    for x, r in pts
                    if r["status"] == "measured" and r.get(key) is not None and r[key] > 0
                ]
                if good:
                    (handles[name],) = ax.plot(*zip(*good, strict=True), marker="o", ms=4, label=name, **style[name])
                capped = [(x, r["seconds"]) for x, r in pts if r["status"] == "time cap"]
                if capped and key == "seconds":
                    (mark,) = ax.plot(*zip(*capped, strict=True), "^", color=style[name]["color"], ms=8, mfc="none")
                    handles.setdefault(name, mark)
        axes[0, col].set_title(("equal ranks" if equal else "unequal ranks") + " (^: lower bound, time cap)")
    d, k = rows[0]["shapes"][0][1], rows[0]["clients"]
    xlabel = f"d (layer d x d), K = {k}" if group == "d" else f"K (clients), layer {d} x {d}"
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for col in range(2):
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("round time (s)")
    axes[1, 0].set_ylabel("peak extra memory (MiB)")
    axes[0, 1].legend(list(handles.values()), list(handles), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"One server round against {'d' if group == 'd' else 'K'} (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
