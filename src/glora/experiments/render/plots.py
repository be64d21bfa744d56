"""PNG plots of a sweep: metric against round, final metric per rule, the metric of each
client rank's model, and cost per round. Figures are built without pyplot (no global
backend state) and saved without a Software tag, so the same runs give the same bytes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from glora.experiments.statistics import Stat, cost_stats, curve, final_stat, majority_score, personal, ranks_of
from glora.experiments.sweep_results import REFERENCES, Results


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _colors(res: Results) -> dict[str, tuple[float, ...]]:
    """One fixed colour per rule across every plot of the report."""
    # tab20 pairs a dark and a light shade of each hue: the ten dark shades first, then the light ones.
    cmap = matplotlib.colormaps["tab20"]
    return {rule: cmap((2 * i) % 20 + (i // 10) % 2) for i, rule in enumerate(res.axis("rules"))}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def _grouped_bars(
    ax: Axes, groups: list[str], series: dict[str, list[Stat | None]], colors: dict[str, tuple[float, ...]]
) -> None:
    """Bars of mean with an error bar of one standard deviation, one bar per series in each group."""
    width = 0.8 / max(1, len(series))
    lo, hi = math.inf, -math.inf
    for j, (name, stats) in enumerate(series.items()):
        points = [(i + (j - (len(series) - 1) / 2) * width, s) for i, s in enumerate(stats) if s is not None]
        if not points:
            continue
        xs = [x for x, _ in points]
        means = [s.mean for _, s in points]
        errs = [s.std or 0.0 for _, s in points]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=name, color=colors[name])
        lo = min(lo, *(m - e for m, e in zip(means, errs, strict=True)))
        hi = max(hi, *(m + e for m, e in zip(means, errs, strict=True)))
    ax.set_xticks(range(len(groups)), groups)
    if math.isfinite(lo):
        # Differences between rules are small next to the metric's range: zoom onto the data.
        pad = max(0.1 * (hi - lo), 0.01)
        ax.set_ylim(lo - pad, hi + pad)


def _legend(fig: Figure, ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()


def plot_final(res: Results, task: str, path: Path) -> Path:
    metric = res.main_metric(task)
    settings = res.settings_of(task)
    series = {r: [final_stat(res, task, s, r, metric) for s in settings] for r in res.axis("rules")}
    series = {r: v for r, v in series.items() if any(x is not None for x in v)}
    fig = Figure(figsize=(max(6.0, 1.2 * len(settings) + 3), 4))
    ax = fig.subplots()
    _grouped_bars(ax, settings, series, _colors(res))
    ax.set_ylabel(f"final {metric} (mean ± std over seeds)")
    ax.set_title(f"{task}: final {metric} per rule")
    _legend(fig, ax)
    return _save(fig, path)


def plot_by_rank(res: Results, task: str, setting: str, path: Path) -> Path:
    metric = res.main_metric(task)
    ranks = ranks_of(res, task, setting)
    rules = [r for r in res.axis("rules") if res.cell(task, setting, r)]
    series = {r: [final_stat(res, task, setting, r, metric, rank=k) for k in [None, *ranks]] for r in rules}
    fig = Figure(figsize=(max(6.0, 1.2 * (len(ranks) + 1) + 3), 4))
    ax = fig.subplots()
    _grouped_bars(ax, ["global", *(f"rank {k}" for k in ranks)], series, _colors(res))
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{task}, {setting}: {metric} of the model each client rank receives")
    _legend(fig, ax)
    return _save(fig, path)


# Rules whose curves coincide (every rule at the majority class, say) stay told apart by
# their markers and a small horizontal offset each.
MARKERS = "osD^vP*Xh<>p"
OFFSET = 0.06  # rounds between neighbouring rules' points


def plot_curves(res: Results, task: str, setting: str, path: Path) -> Path | None:
    metric = res.main_metric(task)
    colors = _colors(res)
    fig = Figure(figsize=(7, 4.4))
    ax = fig.subplots()
    drawn, left_out = [], []
    rules = list(res.axis("rules"))
    for i, rule in enumerate(rules):
        if personal(rule):
            left_out.append(rule)
            continue
        rounds, stats = curve(res, task, setting, rule, metric)
        if not rounds:
            continue
        shift = (i - (len(rules) - 1) / 2) * OFFSET
        x = [t + shift for t in rounds]
        mean = [s.mean for s in stats]
        std = [s.std or 0.0 for s in stats]
        style = "--" if rule in REFERENCES else "-"
        marker = MARKERS[i % len(MARKERS)]
        ax.plot(x, mean, style, marker=marker, markersize=4, color=colors[rule], label=rule)
        lower = [m - s for m, s in zip(mean, std, strict=True)]
        upper = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(x, lower, upper, color=colors[rule], alpha=0.15, linewidth=0)
        drawn.append(rule)
    if not drawn:
        return None
    notes = []
    chance = majority_score(res, task, setting, metric)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="majority class")
    else:
        notes.append("no majority-class line: the evaluation labels are not readable here")
    if left_out:
        notes.append(
            f"not drawn: {', '.join(left_out)} (personalised: no global model a round; their scores are in the tables)"
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (global model)")
    ax.set_title(f"{task}, {setting}: {metric} against round")
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize="x-small", ha="left", va="bottom", wrap=True)
        fig.subplots_adjust(bottom=0.2)
    _legend(fig, ax)
    return _save(fig, path)


def plot_cost(res: Results, setting: str, path: Path) -> Path | None:
    rules, costs = [], []
    for rule in res.axis("rules"):
        c = cost_stats(res, setting, rule)
        if c is not None:
            rules.append(rule)
            costs.append(c)
    if not rules:
        return None
    colors = _colors(res)
    fig = Figure(figsize=(max(7.0, 0.6 * len(rules) + 4), 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(range(len(rules)), [c["server_seconds"].mean for c in costs], color=[colors[r] for r in rules])
    ax1.set_xticks(range(len(rules)), rules, rotation=45, ha="right")
    ax1.set_ylabel("server seconds per round")
    x = range(len(rules))
    ax2.bar([i - 0.2 for i in x], [c["mib_up"].mean for c in costs], 0.4, label="up", color="tab:blue")
    ax2.bar([i + 0.2 for i in x], [c["mib_down"].mean for c in costs], 0.4, label="down", color="tab:orange")
    ax2.set_xticks(range(len(rules)), rules, rotation=45, ha="right")
    ax2.set_ylabel("MiB per round (all sampled clients)")
    ax2.legend(fontsize="small")
    fig.suptitle(f"{setting}: cost per round")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(res: Results, folder: Path) -> dict[str, Path]:
    """Every plot of the report, keyed 'final/<task>', 'by_rank/<task>/<setting>',
    'curve/<task>/<setting>' and 'cost/<setting>'."""
    out: dict[str, Path | None] = {}
    for task in res.axis("tasks"):
        out[f"final/{task}"] = plot_final(res, task, folder / f"final_{_slug(task)}.png")
        for setting in res.axis("settings"):
            if not res.runs_of(task, setting):
                continue
            name = f"{_slug(task)}_{_slug(setting)}.png"
            out[f"curve/{task}/{setting}"] = plot_curves(res, task, setting, folder / f"curve_{name}")
            if ranks_of(res, task, setting):
                out[f"by_rank/{task}/{setting}"] = plot_by_rank(res, task, setting, folder / f"by_rank_{name}")
    for setting in res.axis("settings"):
        out[f"cost/{setting}"] = plot_cost(res, setting, folder / f"cost_{_slug(setting)}.png")
    return {k: v for k, v in out.items() if v is not None}
