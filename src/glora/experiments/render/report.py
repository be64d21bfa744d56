"""``glora report RESULTS_DIR``: tables (markdown and CSV) and plots of a sweep's runs.

The sweep folder is read by ``sweep_results`` and its numbers computed by ``statistics``;
this module lays them out (its cells and tables by ``cells``, the seed-by-seed sections by
``comparisons``). Every number is a mean and sample standard deviation over seeds
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

from glora.aggregation import RULES
from glora.experiments.render.cells import best_rules, fmt, md_table, metric_rows, rule_name
from glora.experiments.render.comparisons import last_section, paired_section, versus_section
from glora.experiments.statistics import (
    AT_MAJORITY,
    Stat,
    at_majority,
    compute_seconds,
    cost_stats,
    final_stat,
    majority_score,
    mixes_devices,
    ranks_of,
    run_costs,
)
from glora.experiments.sweep_results import FINISHED, REFERENCES, Results, Run, load_results
from glora.files import atomic_write


def _summary_line(rule: str) -> str:
    """The first line of a rule's docstring, lower-cased and without its full stop."""
    line = (RULES[rule].__doc__ or rule).strip().splitlines()[0].rstrip(".")
    return line[0].lower() + line[1:]


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
        "The centralized references pool every client's data, so the partition and client ranks do not "
        "apply to them: one run fills every column it shares."
    )
    refs = [r for r in res.axis("rules") if r in REFERENCES]
    if refs:
        out.append(" The references: " + "; ".join(f"`{r}`, {_summary_line(r)}" for r in refs) + ".")
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
        rows = metric_rows(res, task, settings, res.axis("rules"), metric, rank=passes is not False)
        out.append(md_table(["rule", *settings], rows))
        out.append(_majority_text(res, task, settings, metric))
        if f"final/{task}" in plots:
            out.append(f"\n![final {metric} on {task}]({plots[f'final/{task}']})\n")
        for setting in settings:
            ranks = ranks_of(res, task, setting)
            if not ranks:
                continue
            out.append(f"\n### {task}, {setting}: {metric} of the model each client rank receives\n\n")
            out.append(_provenance(res, res.runs_of(task, setting)) + "\n")
            rows = _rank_rows(res, task, setting, ranks, metric)
            out.append(md_table(["rule", "global", *(f"rank {r}" for r in ranks)], rows))
            if f"by_rank/{task}/{setting}" in plots:
                out.append(f"\n![{metric} by rank]({plots[f'by_rank/{task}/{setting}']})\n")
    out.append(paired_section(res))
    out.append(versus_section(res))
    if last > 1:
        out.append(last_section(res, last))
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


def _majority_text(res: Results, task: str, settings: list[str], metric: str) -> str:
    """The rules that sit at the majority class, named per setting (their curves would hide
    behind one another on the plots)."""
    found = {s: at_majority(res, task, s, metric) for s in settings}
    if all(v is None for v in found.values()):
        return "\nThe majority class's score cannot be computed here: no rule is checked against it.\n"
    named = [f"{s}: {', '.join(rules)}" for s, rules in found.items() if rules]
    head = f"\nAt the majority class (seed-mean {metric} within {AT_MAJORITY:g} of its score): "
    return head + ("; ".join(named) if named else "no rule in any setting") + ".\n"


def _rank_rows(res: Results, task: str, setting: str, ranks: list[str], metric: str) -> list[list[str]]:
    rules = [r for r in res.axis("rules") if res.cell(task, setting, r)]
    cols: list[str | None] = [None, *ranks]
    stats = {(c, r): final_stat(res, task, setting, r, metric, rank=c) for c in cols for r in rules}
    best = {c: best_rules({r: stats[c, r] for r in rules}) for c in cols}
    mixed = {r: mixes_devices(res, task, setting, r) for r in rules}
    return [[rule_name(r), *(fmt(stats[c, r], r in best[c], mixed[r]) for c in cols)] for r in rules]


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
                        rule_name(rule),
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
            out.append(md_table(header, rows))
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
    return "\n## Runs not in the tables\n\n" + md_table(["identity", "status", "cells", "error"], rows)


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
        from glora.experiments.render.plots import write_plots

        for key, path in write_plots(res, out_dir / "plots").items():
            plot_paths[key] = path.relative_to(out_dir).as_posix()
            written[key] = path
    for name, text in (("report.md", markdown(res, plot_paths, last)), ("report.csv", csv_text(res, last))):
        atomic_write(out_dir / name, text.encode())
        written[name] = out_dir / name
    return written
