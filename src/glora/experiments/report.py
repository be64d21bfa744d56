"""``glora report RESULTS_DIR``: tables (markdown and CSV) and plots of a sweep's runs.

The sweep folder is read by ``sweep_results`` and its numbers computed by ``statistics``;
this module lays them out. Every number is a mean and sample standard deviation over seeds
of the final-round metric (and, on request, of each seed's mean over its last K
evaluations); every table says which command made its runs and how much compute they took.
The output is deterministic: the same runs give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from glora.experiments.statistics import (
    Stat,
    compute_seconds,
    cost_stats,
    final_stat,
    last_rounds,
    majority_score,
    mixes_devices,
    paired_stat,
    personal,
    ranks_of,
    run_costs,
)
from glora.experiments.sweep import FINISHED
from glora.experiments.sweep_results import REFERENCES, Results, Run, load_results
from glora.federation.results import atomic_write


# -- formatting ---------------------------------------------------------------------------------------
def fmt(stat: Stat | None, best: bool = False, mixed: bool = False) -> str:
    if stat is None:
        return ""
    text = f"{stat.mean:.4f}" + (f" ± {stat.std:.4f}" if stat.std is not None else "")
    return (f"**{text}**" if best else text) + f" ({stat.n})" + (" ‡" if mixed else "")


def _best(stats: dict[str, Stat | None]) -> set[str]:
    """Rules with the highest mean among the federated rules (references excluded); none
    where fewer than two federated rules have a value (a column of one rule ranks nothing) or
    where every one has the same mean (CoLA's columns at MCC 0: no rule is ahead of another)."""
    means = {rule: s.mean for rule, s in stats.items() if s is not None and rule not in REFERENCES}
    top = max(means.values(), default=None)
    best = {rule for rule, m in means.items() if m == top}
    return set() if len(means) < 2 or best == set(means) else best


def _rule_name(rule: str) -> str:
    mark = " †" if personal(rule) else ""
    return f"{rule} (reference){mark}" if rule in REFERENCES else f"{rule}{mark}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _provenance(res: Results, runs: list[Run]) -> str:
    """The compute of ``runs``, and the commands behind them one per line in a code block
    (every command of the folder where a run's were not recorded: sweeps indexed before runs
    kept them)."""
    if all(r.commands is not None for r in runs):
        used = {c for r in runs for c in r.commands}
        chosen = [c for c in res.index["commands"] if c in used]
    else:
        chosen = res.index["commands"]
    n = f"{len(runs)} run" + "s" * (len(runs) != 1)
    block = "\n".join(["```bash", *chosen, "```"])
    return f"Compute: {compute_seconds(runs) / 3600:.2f} h (wall time of {n}). {_devices(runs)} Made by:\n\n{block}\n"


def _devices(runs: list[Run]) -> str:
    """Which kinds of device trained ``runs``, with counts, in a fixed order."""
    counts = Counter(r.device_name for r in runs)
    return "Trained on: " + ", ".join(f"{d} ({n})" for d, n in sorted(counts.items())) + "."


def _learning_rates(res: Results) -> str:
    lines = []
    for task in res.axis("tasks"):
        by_rule: dict[str, set[float]] = {}
        for r in res.runs_of(task=task):
            by_rule.setdefault(r.config["rule"], set()).add(r.config["lr"])
        values = {lr for lrs in by_rule.values() for lr in lrs}
        if len(values) == 1:
            lines.append(f"- {task}: learning rate {values.pop():g}, shared by every rule.")
        else:
            per = ", ".join(f"{r} {'/'.join(f'{v:g}' for v in sorted(lrs))}" for r, lrs in sorted(by_rule.items()))
            lines.append(f"- {task}: learning rates differ across rules: {per}.")
    return "\n".join(lines) + "\n"


def markdown(res: Results, plots: dict[str, str], last: int = 1) -> str:
    """The report as markdown; ``plots`` maps plot keys to paths relative to the report. With
    ``last`` > 1, a section of each seed's mean over its last ``last`` evaluations follows the
    final-round tables."""
    idx = res.index
    finished = res.finished()
    out = [f"# Sweep `{idx['preset']}`\n\n"]
    if idx.get("description"):
        out.append(idx["description"].strip() + "\n\n")
    out.append(
        f"{len(finished)} of {len(res.runs)} runs finished; total compute {compute_seconds(finished) / 3600:.2f} h "
        "(the sum of their recorded wall time: rounds, evaluation and checkpoints; model loading not included). "
    )
    linked = [r for r in finished if r.linked]
    if linked:
        out.append(
            f"{len(linked)} of them ({compute_seconds(linked) / 3600:.2f} h) are links to the same runs of another "
            "sweep (`--reuse-from`), whose compute is counted there. "
        )
    out.append("Made by:\n")
    out.append("".join(f"- `{c}`\n" for c in idx["commands"]))
    out.append("\nSettings:\n")
    for name in res.axis("settings"):
        body = idx["settings"].get(name, {})
        note = body.get("note", "")
        overrides = json.dumps(body.get("overrides", {}), sort_keys=True)
        variant = f"; a variant of `{body['versus']}`" if body.get("versus") else ""
        out.append(f"- `{name}`: {note + ' ' if note else ''}(overrides {overrides}{variant})\n")
    out.append("\nLearning rates (from the runs' configs):\n")
    out.append(_learning_rates(res))
    out.append(
        "\nEach cell: the final-round metric, mean ± sample standard deviation over seeds, and (n) the number "
        "of seeds. **Bold**: the best federated rule of the column (references excluded; ties all bold, "
        "none where every federated rule has the same mean). "
        "† the mean of the clients' own models (a personalised rule), not one global model. "
        "The centralized reference pools every client's data, so the partition and client ranks do not "
        "apply to it: one run fills every column it shares."
    )
    if any(
        mixes_devices(res, t, s, r) for t in res.axis("tasks") for s in res.axis("settings") for r in res.axis("rules")
    ):
        out.append(
            " ‡ the seeds of this cell trained on different kinds of device (each table says which, with "
            "counts): its spread holds the devices' different numerics as well as the seeds'."
        )
    out.append("\n")
    for task in res.axis("tasks"):
        metric = res.main_metric(task)
        settings = res.settings_of(task)
        out.append(f"\n## {task}: {metric}\n\n")
        out.append(_provenance(res, res.runs_of(task=task)) + "\n")
        passes, verdict = gate(res, task)
        out.append(f"\nSanity gate (results/sweeps/PROTOCOL.md): {verdict}.\n\n")
        rows = _metric_rows(res, task, settings, res.axis("rules"), metric, rank=passes is not False)
        out.append(_table(["rule", *settings], rows))
        if f"final/{task}" in plots:
            out.append(f"\n![final {metric} on {task}]({plots[f'final/{task}']})\n")
        for setting in settings:
            ranks = ranks_of(res, task, setting)
            if not ranks:
                continue
            out.append(f"\n### {task}, {setting}: {metric} of the model each client rank receives\n\n")
            out.append(_provenance(res, res.runs_of(task, setting)) + "\n")
            rows = _rank_rows(res, task, setting, ranks, metric)
            out.append(_table(["rule", "global", *(f"rank {r}" for r in ranks)], rows))
            if f"by_rank/{task}/{setting}" in plots:
                out.append(f"\n![{metric} by rank]({plots[f'by_rank/{task}/{setting}']})\n")
    out.append(_paired_section(res))
    out.append(_versus_section(res))
    if last > 1:
        out.append(_last_section(res, last))
    curves = [k for k in plots if k.startswith("curve/")]
    if curves:
        out.append(
            "\n## Metric against round\n\nThe global model's metric at each evaluated round, mean over seeds with a "
            "band of ± one standard deviation. Personalised rules (†) are scored on the clients' own models "
            "at the end only, so they are in the tables, not here.\n\n"
        )
        out.append("".join(f"![{k[len('curve/') :]}]({plots[k]})\n" for k in curves))
    out.append(_cost_section(res, plots))
    out.append(_incomplete_section(res))
    return "".join(out)


# The sanity gate of results/sweeps/PROTOCOL.md: how far above the majority class the
# centralized reference and FedIT under IID must score for a table to rank anything.
GATE_MARGIN = {"accuracy": 0.05, "f1": 0.05, "f1_macro": 0.05}
GATE_MARGIN_CORRELATION = 0.10


def gate(res: Results, task: str) -> tuple[bool | None, str]:
    """(passes, the verdict in words) of a task's tables: None where the sweep has no IID
    setting with both the centralized reference and FedIT, or no majority-class score."""
    metric = res.main_metric(task)
    iid = [
        s
        for s in res.settings_of(task)
        if res.cell(task, s, "fedit") and all(run.config.get("alpha") is None for _, run in res.cell(task, s, "fedit"))
    ]
    checked = []
    for setting in iid:
        majority = majority_score(res, task, setting, metric)
        refs = {r: final_stat(res, task, setting, r, metric) for r in ("centralized", "fedit")}
        if majority is None or any(v is None for v in refs.values()):
            continue
        margin = GATE_MARGIN.get(metric, GATE_MARGIN_CORRELATION)
        passes = all(v.mean >= majority + margin for v in refs.values())
        scores = ", ".join(f"{r} {v.mean:.4f}" for r, v in refs.items())
        checked.append((passes, f"{setting}: {scores}; majority class {majority:.4f}, margin {margin:.2f}"))
    if not checked:
        return None, "not checked (no IID column with the centralized reference and FedIT, or no majority score)"
    passes = all(p for p, _ in checked)
    words = "informative" if passes else "**not informative**: no rule is ranked in this task's tables"
    return passes, f"{words} ({'; '.join(text for _, text in checked)})"


def _metric_rows(
    res: Results,
    task: str,
    settings: list[str],
    rules: list[str],
    metric: str,
    last: int | None = None,
    rank: bool = True,
) -> list[list[str]]:
    stats = {(s, r): final_stat(res, task, s, r, metric, last=last) for s in settings for r in rules}
    best = {s: _best({r: stats[s, r] for r in rules}) if rank else set() for s in settings}
    return [
        [_rule_name(r), *(fmt(stats[s, r], r in best[s], mixes_devices(res, task, s, r)) for s in settings)]
        for r in rules
        if any(stats[s, r] is not None for s in settings)
    ]


def _rank_rows(res: Results, task: str, setting: str, ranks: list[str], metric: str) -> list[list[str]]:
    rules = [r for r in res.axis("rules") if res.cell(task, setting, r)]
    cols: list[str | None] = [None, *ranks]
    stats = {(c, r): final_stat(res, task, setting, r, metric, rank=c) for c in cols for r in rules}
    best = {c: _best({r: stats[c, r] for r in rules}) for c in cols}
    mixed = {r: mixes_devices(res, task, setting, r) for r in rules}
    return [[_rule_name(r), *(fmt(stats[c, r], r in best[c], mixed[r]) for c in cols)] for r in rules]


def _paired_tables(res: Results, anchor: str, min_seeds: int, last: int | None = None, level: str = "###") -> list[str]:
    """Per task, ``anchor`` against each other rule seed by seed (see ``paired_stat``), for the
    cells where both have ``min_seeds`` seeds in common (none where ``anchor`` has no runs)."""
    out: list[str] = []
    if anchor not in res.axis("rules"):
        return out
    for task in res.axis("tasks"):
        metric = res.main_metric(task)
        settings = res.settings_of(task)
        rows = []
        for rule in res.axis("rules"):
            if rule == anchor:
                continue
            pairs = {s: paired_stat(res, task, s, anchor, rule, metric, last) for s in settings}
            pairs = {s: p for s, p in pairs.items() if p is not None and p[0].n >= min_seeds}
            if pairs:
                rows.append([_rule_name(rule), *(_fmt_pair(pairs.get(s)) for s in settings)])
        if rows:
            out.append(f"\n{level} {task}: {metric}\n\n" + _table(["against", *settings], rows))
    return out


def _partners(res: Results) -> dict[str, str]:
    """Each variant setting (``versus`` in the preset) and the setting it is a variant of."""
    return {name: body["versus"] for name, body in res.index.get("settings", {}).items() if body.get("versus")}


def _versus_tables(res: Results, min_seeds: int, last: int | None = None, level: str = "###") -> list[str]:
    """Per task, each rule of a variant column against each rule of its partner column, seed
    by seed (see ``paired_stat``), where they have ``min_seeds`` seeds in common."""
    out: list[str] = []
    partners = _partners(res)
    for task in res.axis("tasks"):
        metric = res.main_metric(task)
        settings = res.settings_of(task)
        rows = []
        for setting in settings:
            partner = partners.get(setting)
            if partner not in settings:
                continue
            for rule in res.axis("rules"):
                pairs = {
                    other: paired_stat(res, task, setting, rule, other, metric, last, other_setting=partner)
                    for other in res.axis("rules")
                }
                pairs = {o: p for o, p in pairs.items() if p is not None and p[0].n >= min_seeds}
                if pairs:
                    rows.append((f"{setting}: {_rule_name(rule)}", partner, pairs))
        if rows:
            others = [o for o in res.axis("rules") if any(o in pairs for _, _, pairs in rows)]
            cells = [[name, partner, *(_fmt_pair(pairs.get(o)) for o in others)] for name, partner, pairs in rows]
            table = _table(["variant", "against column", *(_rule_name(o) for o in others)], cells)
            out.append(f"\n{level} {task}: {metric}\n\n" + table)
    return out


def _versus_section(res: Results, min_seeds: int = 2) -> str:
    """Each variant column against its partner column, seed by seed."""
    out = _versus_tables(res, min_seeds)
    if not out:
        return ""
    head = (
        "\n## Each variant column against the column it varies, seed by seed\n\nA variant column (`versus` in the "
        "preset) changes one thing of another column and keeps its splits, so a seed pairs the two. Each cell: "
        "the variant's final metric minus the metric of the rule in the column head in the other column, "
        "mean ± sample standard deviation over the seeds both finished (n), and on how many of them the variant "
        f"came out ahead. Only cells with at least {min_seeds} seeds in common.\n"
    )
    return head + "".join(out)


def _paired_section(res: Results, anchor: str = "glora", min_seeds: int = 2) -> str:
    """GLoRA against each other rule, seed by seed, where both have ``min_seeds`` seeds in common."""
    out = _paired_tables(res, anchor, min_seeds)
    if not out:
        return ""
    head = (
        f"\n## {anchor} against each rule, seed by seed\n\nEach cell: {anchor}'s final metric minus the rule's, "
        "mean and paired 95% t-interval over the seeds both finished (n), in words: ahead, behind, or a tie "
        f"where the interval holds 0; and on how many seeds {anchor} came out ahead. A seed fixes the "
        "partition, the sampled clients and the initial adapters for every rule, so this spread is the rules' "
        "own, without the splits' (which can dominate the tables above). "
        f"Only cells with at least {min_seeds} seeds in common.\n"
    )
    return head + "".join(out)


def _last_section(res: Results, last: int, anchor: str = "glora", min_seeds: int = 2) -> str:
    """The tables again, on each seed's mean over its last ``last`` evaluations of the global
    model, and the seed-by-seed comparison on the same numbers."""
    out = [
        f"\n## Mean of the last {last} evaluations\n\nEach cell: each seed's metric of the global model averaged "
        f"over its last {last} evaluated rounds (the rounds are in the column heads), then mean ± sample standard "
        "deviation over seeds (n). Steadier than one final round where the sampled clients move the model by "
        "several points between evaluations. Personalised rules (†) have no global model a round and are left "
        "out. **Bold**, ‡: as above.\n"
    ]
    for task in res.axis("tasks"):
        metric = res.main_metric(task)
        settings = res.settings_of(task)
        rows = _metric_rows(res, task, settings, res.axis("rules"), metric, last)
        heads = [f"{s} (rounds {', '.join(map(str, last_rounds(res, task, s, metric, last)))})" for s in settings]
        out.append(f"\n### {task}: {metric}, mean of the last {last} evaluations\n\n" + _table(["rule", *heads], rows))
    paired = _paired_tables(res, anchor, min_seeds, last, level="####")
    if paired:
        out.append(
            f"\n### {anchor} against each rule, seed by seed, on the mean of the last {last} evaluations\n\n"
            f"As in the seed-by-seed section above; only cells with at least {min_seeds} seeds in common.\n"
        )
        out.extend(paired)
    versus = _versus_tables(res, min_seeds, last, level="####")
    if versus:
        out.append(
            f"\n### Each variant column against the column it varies, on the mean of the last {last} evaluations\n\n"
            f"As in the section above; only cells with at least {min_seeds} seeds in common.\n"
        )
        out.extend(versus)
    return "".join(out)


def _fmt_pair(pair: tuple[Stat, int] | None) -> str:
    """The paired difference: mean, its 95% t-interval and the verdict in words (an interval
    holding 0 is a tie), with the seeds (n) and on how many the first rule came out ahead."""
    if pair is None:
        return ""
    stat, ahead = pair
    interval = stat.interval()
    if interval is None:
        return f"{stat.mean:+.4f} ({stat.n}; ahead on {ahead})"
    lo, hi = interval
    word = "tie" if lo <= 0 <= hi else ("ahead" if lo > 0 else "behind")
    return f"{stat.mean:+.4f} [{lo:+.4f}, {hi:+.4f}] {word} ({stat.n}; ahead on {ahead})"


def _cost_section(res: Results, plots: dict[str, str]) -> str:
    out = [
        "\n## Cost per round\n\nMeans over every run of the cell (all tasks and seeds; n runs): the server's "
        "aggregation time, the MiB all sampled clients send up and receive down per round, and the wall time "
        "of a whole run.\n"
    ]
    for setting in res.axis("settings"):
        rows = []
        for rule in res.axis("rules"):
            c = cost_stats(res, setting, rule)
            if c is not None:
                rows.append(
                    [
                        _rule_name(rule),
                        f"{c['server_seconds'].mean:.4f}",
                        f"{c['mib_up'].mean:.3f}",
                        f"{c['mib_down'].mean:.3f}",
                        f"{c['wall_seconds'].mean / 60:.1f}",
                        str(c["wall_seconds"].n),
                    ]
                )
        if rows:
            out.append(f"\n### {setting}\n\n" + _provenance(res, res.runs_of(setting=setting)) + "\n")
            header = ["rule", "server s / round", "MiB up / round", "MiB down / round", "wall min / run", "n runs"]
            out.append(_table(header, rows))
            if f"cost/{setting}" in plots:
                out.append(f"\n![cost per round, {setting}]({plots[f'cost/{setting}']})\n")
    return "".join(out)


def _incomplete_section(res: Results) -> str:
    missing = [r for r in res.runs if r.status != FINISHED]
    if not missing:
        return ""
    rows = []
    for r in missing:
        cells = "; ".join(f"{x['task']}/{x['setting']}/{x['rule']}/seed {x['seed']}" for x in r.labels)
        rows.append([r.identity, r.status, cells, (r.error or "").replace("|", "/")])
    return "\n## Runs not in the tables\n\n" + _table(["identity", "status", "cells", "error"], rows)


def csv_text(res: Results, last: int = 1) -> str:
    """Long format: one row per (task, setting, rule, quantity), with n, mean, std and the
    kinds of device the cell's runs trained on ("cpu+cuda" where its seeds mix them). With
    ``last`` > 1, quantities ``last<K>.<metric>`` hold the mean over the last K evaluations."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "setting", "rule", "quantity", "n", "mean", "std", "devices"])
    for task in res.axis("tasks"):
        for setting in res.axis("settings"):
            for rule in res.axis("rules"):
                cell = res.cell(task, setting, rule)
                if not cell:
                    continue
                rows: dict[str, Stat | None] = {}
                for m in sorted({k for _, r in cell for k in (r.summary.get("final") or {})}):
                    rows[f"final.{m}"] = final_stat(res, task, setting, rule, m)
                    for rank in ranks_of(res, task, setting):
                        rows[f"rank{rank}.{m}"] = final_stat(res, task, setting, rule, m, rank=rank)
                    if last > 1:
                        rows[f"last{last}.{m}"] = final_stat(res, task, setting, rule, m, last=last)
                runs = [r for _, r in cell]
                devices = "+".join(sorted({r.device_name for r in runs}))
                costs = run_costs(runs)
                rows["server_seconds_per_round"] = costs["server_seconds"]
                rows["mib_up_per_round"] = costs["mib_up"]
                rows["mib_down_per_round"] = costs["mib_down"]
                rows["wall_seconds"] = costs["wall_seconds"]
                for quantity, s in rows.items():
                    if s is not None:
                        std = "" if s.std is None else f"{s.std:.6f}"
                        w.writerow([task, setting, rule, quantity, s.n, f"{s.mean:.6f}", std, devices])
    return buf.getvalue()


def write_report(results_dir: Path, out_dir: Path | None = None, plots: bool = True, last: int = 1) -> dict[str, Path]:
    """report.md, report.csv and (unless ``plots`` is False) PNG plots in ``out_dir``
    (default: the results folder); with ``last`` > 1 they also hold each seed's mean over its
    last ``last`` evaluations. Returns the paths written."""
    if last < 1:
        raise ValueError(f"--last-evals must be 1 or more (the number of final evaluations to average), not {last}")
    res = load_results(results_dir)
    if not res.finished():
        raise ValueError(f"{results_dir}: no run has finished yet; nothing to report (see `glora sweep --dry-run`)")
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_paths: dict[str, str] = {}
    if plots:
        from glora.experiments.plots import write_plots

        for key, path in write_plots(res, out_dir / "plots").items():
            plot_paths[key] = path.relative_to(out_dir).as_posix()
            written[key] = path
    for name, text in (("report.md", markdown(res, plot_paths, last)), ("report.csv", csv_text(res, last))):
        atomic_write(out_dir / name, text.encode())
        written[name] = out_dir / name
    return written
