"""The report's seed-by-seed sections: GLoRA against each rule, each variant column against
the column it varies (both paired by seed, since a seed fixes the partition, the sampled
clients and the initial adapters for every rule), and the tables again on each seed's mean
over its last K evaluations."""

from __future__ import annotations

from glora.experiments.render.cells import md_table, metric_rows, rule_name
from glora.experiments.statistics import Stat, last_rounds, paired_stat
from glora.experiments.sweep_results import Results


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
                rows.append([rule_name(rule), *(_fmt_pair(pairs.get(s)) for s in settings)])
        if rows:
            out.append(f"\n{level} {task}: {metric}\n\n" + md_table(["against", *settings], rows))
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
                    rows.append((f"{setting}: {rule_name(rule)}", partner, pairs))
        if rows:
            others = [o for o in res.axis("rules") if any(o in pairs for _, _, pairs in rows)]
            cells = [[name, partner, *(_fmt_pair(pairs.get(o)) for o in others)] for name, partner, pairs in rows]
            table = md_table(["variant", "against column", *(rule_name(o) for o in others)], cells)
            out.append(f"\n{level} {task}: {metric}\n\n" + table)
    return out


def versus_section(res: Results, min_seeds: int = 2) -> str:
    """Each variant column against its partner column, seed by seed."""
    out = _versus_tables(res, min_seeds)
    if not out:
        return ""
    head = (
        "\n## Each variant column against the column it varies, seed by seed\n\nA variant column (`versus` in the "
        "preset) changes one thing of another column and keeps its splits, so a seed pairs the two. Each cell: "
        "the variant's final metric minus the metric of the rule in the column head in the other column, "
        "mean and paired 95% t-interval over the seeds both finished (n), and on how many of them the variant "
        f"came out ahead. Only cells with at least {min_seeds} seeds in common.\n"
    )
    return head + "".join(out)


def paired_section(res: Results, anchor: str = "glora", min_seeds: int = 2) -> str:
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


def last_section(res: Results, last: int, anchor: str = "glora", min_seeds: int = 2) -> str:
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
        rows = metric_rows(res, task, settings, res.axis("rules"), metric, last)
        heads = [f"{s} (rounds {', '.join(map(str, last_rounds(res, task, s, metric, last)))})" for s in settings]
        out.append(
            f"\n### {task}: {metric}, mean of the last {last} evaluations\n\n" + md_table(["rule", *heads], rows)
        )
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
