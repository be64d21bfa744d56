"""The report: its numbers equal a hand computation on hand-written run folders, the best
federated rule per column is marked, and the output is the same bytes every time."""

from __future__ import annotations

import csv
import io
import json

import pytest

from glora.experiments.render.report import markdown, write_report
from glora.experiments.sweep_results import load_results

MIB = 2**20


def _run(root, identity, labels, rule, accuracy=None, by_rank=None, wall=360.0, status="finished", lr=2e-3):
    """One run folder as the federation loop writes it (2 rounds, evaluated at each)."""
    folder = root / identity
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"identity": identity, "rule": rule, "lr": lr, "task": "sst2"}))
    rows = [
        {"round": 1, "server_seconds": 0.1, "bytes_up": 1 * MIB, "bytes_down": 2 * MIB, "eval": {"accuracy": 0.6}},
        {"round": 2, "server_seconds": 0.3, "bytes_up": 3 * MIB, "bytes_down": 2 * MIB, "eval": {"accuracy": accuracy}},
    ]
    if status == "interrupted":
        rows = rows[:1]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "failed":
        (folder / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: out of memory\n")
    if status == "finished":
        summary = {
            "final": {"accuracy": accuracy},
            "final_global": {"accuracy": accuracy},
            "final_by_rank": by_rank,
            "main_metric": "accuracy",
            "wall_seconds": wall,
            "rule": rule,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    return identity, {"labels": [{"task": "sst2", "setting": s, "rule": rule, "seed": seed} for s, seed in labels]}


@pytest.fixture
def results(tmp_path):
    """sst2; settings s1 (equal ranks) and s2 (unequal ranks, per-rank results); glora, fedit
    and the centralized reference, whose one run fills both columns."""
    root = tmp_path / "sweep"
    runs = dict(
        [
            _run(root, "g1s0", [("s1", 0)], "glora", 0.80),
            _run(root, "g1s1", [("s1", 1)], "glora", 0.82),
            _run(root, "g1s2", [("s1", 2)], "glora", 0.84),
            _run(root, "f1s0", [("s1", 0)], "fedit", 0.79),
            _run(root, "f1s1", [("s1", 1)], "fedit", 0.85),
            _run(root, "f1s2", [("s1", 2)], "fedit", 0.83),
            _run(root, "c0", [("s1", 0), ("s2", 0)], "centralized", 0.90),
            _run(root, "g2s0", [("s2", 0)], "glora", 0.70, by_rank={"2": {"accuracy": 0.60}, "8": {"accuracy": 0.70}}),
            _run(root, "g2s1", [("s2", 1)], "glora", 0.72, by_rank={"2": {"accuracy": 0.66}, "8": {"accuracy": 0.72}}),
            _run(root, "f2s0", [("s2", 0)], "fedit", 0.705, by_rank={"2": {"accuracy": 0.68}, "8": {"accuracy": 0.71}}),
            _run(root, "f2s1", [("s2", 1)], "fedit", status="failed"),
            _run(root, "g2s2", [("s2", 2)], "glora", status="interrupted"),
        ]
    )
    index = {
        "preset": "fixture",
        "description": "A hand-made sweep.",
        "source": "test",
        "commands": ["glora sweep fixture --results sweep"],
        "axes": {
            "tasks": ["sst2"],
            "settings": ["s1", "s2"],
            "rules": ["glora", "fedit", "centralized"],
            "seeds": [0, 1, 2],
        },
        "settings": {"s1": {"note": "equal ranks", "overrides": {"ranks": "8"}}, "s2": {"note": "", "overrides": {}}},
        "runs": runs,
    }
    (root / "sweep.json").write_text(json.dumps(index))
    return root


def _csv_rows(path):
    return {(r["setting"], r["rule"], r["quantity"]): r for r in csv.DictReader(io.StringIO(path.read_text()))}


def _check(rows, key, n, mean, std):
    """The report.csv row ``key`` holds n seeds, this mean and this sample std (None: one seed)."""
    row = rows[key]
    assert int(row["n"]) == n and float(row["mean"]) == pytest.approx(mean, abs=1e-6)
    assert (row["std"] == "") if std is None else float(row["std"]) == pytest.approx(std, abs=1e-6)


def _section(md, heading, end="\n## "):
    """The markdown from ``heading`` up to the next heading that starts with ``end``."""
    return md.split(heading)[1].split(end)[0]


def _commands(md):
    """The commands of the first ```bash block in ``md``, one per line."""
    return md.split("```bash\n")[1].split("\n```")[0].split("\n")


def test_numbers_equal_a_hand_computation(results):
    write_report(results, plots=False)
    rows = _csv_rows(results / "report.csv")

    # glora, s1: 0.80, 0.82, 0.84 -> mean 0.82, sample std sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02.
    _check(rows, ("s1", "glora", "final.accuracy"), 3, 0.82, 0.02)
    # fedit, s1: 0.79, 0.85, 0.83 -> mean 2.47 / 3; deviations -1/30, 2/75, 1/150:
    # squares sum to 0.0018667, / 2 = 0.00093333, sqrt = 0.0305505.
    _check(rows, ("s1", "fedit", "final.accuracy"), 3, 2.47 / 3, 0.0305505)
    # One centralized run fills both columns; one seed has no spread.
    _check(rows, ("s1", "centralized", "final.accuracy"), 1, 0.90, None)
    _check(rows, ("s2", "centralized", "final.accuracy"), 1, 0.90, None)
    # s2: fedit's second seed failed, glora's third was interrupted: neither counts.
    _check(rows, ("s2", "glora", "final.accuracy"), 2, 0.71, 0.0141421)
    _check(rows, ("s2", "fedit", "final.accuracy"), 1, 0.705, None)
    _check(rows, ("s2", "glora", "rank2.accuracy"), 2, 0.63, 0.0424264)
    _check(rows, ("s2", "glora", "rank8.accuracy"), 2, 0.71, 0.0141421)
    # Costs: server seconds (0.1 + 0.3) / 2 = 0.2 a round; MiB up (1 + 3) / 2 = 2, down 2.
    _check(rows, ("s1", "glora", "server_seconds_per_round"), 3, 0.2, 0.0)
    _check(rows, ("s1", "glora", "mib_up_per_round"), 3, 2.0, 0.0)
    _check(rows, ("s1", "glora", "mib_down_per_round"), 3, 2.0, 0.0)
    # The report says which budget the reference of this folder had (and names no other).
    md = (results / "report.md").read_text()
    assert "The references: `centralized`, pooled data at the examples the whole federation sees" in md
    assert "`centralized-steps`" not in md

    md = (results / "report.md").read_text()
    # Best federated rule per column in bold: fedit in s1 (0.8233 > 0.82), glora in s2 (0.71 > 0.705);
    # the centralized reference is higher in both but is not a competitor.
    assert "| glora | 0.8200 ± 0.0200 (3) | **0.7100 ± 0.0141** (2) |" in md
    assert "| fedit | **0.8233 ± 0.0306** (3) | 0.7050 (1) |" in md
    assert "| centralized (reference) | 0.9000 (1) | 0.9000 (1) |" in md
    # Per-rank table of s2: fedit's 0.68 beats glora's 0.63 at rank 2; at rank 8 both have 0.71:
    # every federated rule of the column has the same mean, so none is marked.
    assert "| glora | **0.7100 ± 0.0141** (2) | 0.6300 ± 0.0424 (2) | 0.7100 ± 0.0141 (2) |" in md
    assert "| fedit | 0.7050 (1) | **0.6800** (1) | 0.7100 (1) |" in md
    # Provenance: the command, and compute = 10 finished runs x 360 s = 1.00 h (the shared
    # centralized run counted once).
    assert "10 of 12 runs finished; total compute 1.00 h" in md
    assert "Compute: 1.00 h (wall time of 10 runs). Trained on: not recorded (10). Made by:" in md
    assert _commands(_section(md, "## sst2: accuracy")) == ["glora sweep fixture --results sweep"]
    assert "sst2: learning rate 0.002, shared by every rule." in md
    assert "| f2s1 | failed | sst2/s2/fedit/seed 1 | RuntimeError: out of memory |" in md
    assert "| g2s2 | interrupted | sst2/s2/glora/seed 2 |  |" in md
    # Seed by seed, glora - fedit on s1: +0.01, -0.03, +0.01 -> mean -0.01/3; deviations
    # 0.04/3, -0.08/3, 0.04/3: squares sum to 0.0096/9, / 2, sqrt = 0.0230940; ahead on 2 of 3.
    # Cells with one seed in common (s2's fedit, either centralized column) are left out.
    paired = _section(md, "## glora against each rule, seed by seed")
    assert "| against | s1 | s2 |" in paired
    assert "| fedit | -0.0033 [-0.0607, +0.0540] tie (3; ahead on 2) |  |" in paired
    assert "centralized" not in paired


def test_mean_of_the_last_evaluations(results):
    """--last-evals 2 averages each seed's last two evaluations of the global model: it can
    rank the rules differently from the final round (here glora's first round was better),
    leaves the final-round tables alone, and leaves out personalised rules (no global model)."""
    for identity in ("g1s0", "g1s1", "g1s2"):
        path = results / identity / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[0]["eval"]["accuracy"] = 0.9
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = json.loads((results / "sweep.json").read_text())
    for seed in (0, 1):
        identity, entry = _run(results, f"p1s{seed}", [("s1", seed)], "fedsa-lora", 0.75)
        index["runs"][identity] = entry
    (results / "sweep.json").write_text(json.dumps(index))
    write_report(results, plots=False, last=2)
    rows = _csv_rows(results / "report.csv")

    # glora, s1: (0.9 + 0.80) / 2, (0.9 + 0.82) / 2, (0.9 + 0.84) / 2 = 0.85, 0.86, 0.87.
    _check(rows, ("s1", "glora", "last2.accuracy"), 3, 0.86, 0.01)
    # fedit, s1: 0.695, 0.725, 0.715: half the final rounds' deviations, so half their std.
    _check(rows, ("s1", "fedit", "last2.accuracy"), 3, (0.695 + 0.725 + 0.715) / 3, 0.0305505 / 2)
    _check(rows, ("s1", "glora", "final.accuracy"), 3, 0.82, 0.02)
    assert ("s1", "fedsa-lora", "last2.accuracy") not in rows and ("s1", "fedsa-lora", "final.accuracy") in rows

    md = (results / "report.md").read_text()
    final, last = md.split("## Mean of the last 2 evaluations")
    assert "| fedit | **0.8233 ± 0.0306** (3) | 0.7050 (1) |" in final
    assert "| fedsa-lora † | 0.7500 ± 0.0000 (2) |  |" in final
    # glora s2: 0.65, 0.66; fedit s2: 0.6525. glora is now best in both columns.
    table = _section(last, "### sst2: accuracy, mean of the last 2 evaluations", end="\n### ")
    assert "| rule | s1 (rounds 1, 2) | s2 (rounds 1, 2) |" in table
    assert "| glora | **0.8600 ± 0.0100** (3) | **0.6550 ± 0.0071** (2) |" in table
    assert "| fedit | 0.7117 ± 0.0153 (3) | 0.6525 (1) |" in table
    assert "fedsa-lora" not in table
    # Seed by seed on the same numbers: 0.155, 0.135, 0.155 -> +0.1483, 95% interval clear of 0;
    # the final-round comparison above is unchanged.
    assert "| fedit | +0.1483 [+0.1196, +0.1770] ahead (3; ahead on 3) |  |" in last
    assert "| fedit | -0.0033 [-0.0607, +0.0540] tie (3; ahead on 2) |  |" in final
    # Without --last-evals the report has no such section; 0 is refused.
    assert "Mean of the last" not in markdown(load_results(results), {})
    with pytest.raises(ValueError, match="--last-evals must be 1 or more"):
        write_report(results, last=0)


def test_each_table_names_the_commands_of_its_own_runs(results):
    index = json.loads((results / "sweep.json").read_text())
    first, second = "glora sweep fixture --results sweep --only-settings s1", "glora sweep fixture --only-settings s2"
    index["commands"] = [first, second]
    for identity, entry in index["runs"].items():
        entry["commands"] = [first if identity == "c0" or entry["labels"][0]["setting"] == "s1" else second]
    (results / "sweep.json").write_text(json.dumps(index))

    def cost_commands(setting):
        md = markdown(load_results(results), {})
        return _commands(md.split(f"### {setting}\n\n")[1])

    # s1's runs were all made by the first command; s2's by the second, except the centralized
    # run that fills both columns, made by the first.
    assert cost_commands("s1") == [first]
    assert cost_commands("s2") == [first, second]
    # A folder indexed before runs recorded their commands names every command.
    del index["runs"]["g1s0"]["commands"]
    (results / "sweep.json").write_text(json.dumps(index))
    assert cost_commands("s1") == [first, second]


def test_cells_whose_seeds_trained_on_different_devices_are_marked(results):
    """Seed 0 of glora/s1 on a GPU, the rest on the CPU (one older run known only by its torch
    build's tag): that cell, and only it, carries the mark; each table counts its devices."""
    for identity in ("g1s0", "g1s1", "g1s2", "f1s0", "f1s1", "f1s2", "c0", "g2s0", "g2s1", "f2s0"):
        meta = {"device": "cuda"} if identity == "g1s0" else {"device": "cpu"}
        if identity == "g1s2":
            meta = {"torch": "2.13.0+cpu"}
        (results / identity / "meta.json").write_text(json.dumps(meta))
    write_report(results, plots=False)
    md = (results / "report.md").read_text()
    assert "| glora | 0.8200 ± 0.0200 (3) ‡ | **0.7100 ± 0.0141** (2) |" in md
    assert "| fedit | **0.8233 ± 0.0306** (3) | 0.7050 (1) |" in md
    assert "‡ the seeds of this cell trained on different kinds of device" in md
    assert "(wall time of 10 runs). Trained on: cpu (9), cuda (1)." in md
    rows = _csv_rows(results / "report.csv")
    assert rows["s1", "glora", "final.accuracy"]["devices"] == "cpu+cuda"
    assert rows["s1", "fedit", "final.accuracy"]["devices"] == "cpu"
    # A run with no meta.json is counted as such, and it too splits a cell from its recorded seeds.
    (results / "g1s0" / "meta.json").unlink()
    md = markdown(load_results(results), {})
    assert "Trained on: cpu (9), not recorded (1)." in md and "| glora | 0.8200 ± 0.0200 (3) ‡ |" in md


def test_one_kind_of_device_marks_nothing(results):
    md = markdown(load_results(results), {})
    assert "‡" not in md and "Trained on: not recorded (10)." in md


def test_report_is_deterministic(results, tmp_path):
    first = write_report(results, tmp_path / "a")
    second = write_report(results, tmp_path / "b")
    assert sorted(first) == sorted(second)
    assert any(k.startswith("curve/") for k in first) and "by_rank/sst2/s2" in first and "cost/s1" in first
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
    assert first["report.md"].read_text().count("](plots/") == len(first) - 2


def test_report_errors(tmp_path, results):
    with pytest.raises(ValueError, match=r"has no sweep\.json"):
        write_report(tmp_path)
    # A second config in a cell and seed (a preset changed under the folder) is refused, not
    # averaged as if it were another seed.
    index = json.loads((results / "sweep.json").read_text())
    identity, entry = _run(results, "g1s0new", [("s1", 0)], "glora", 0.5)
    (results / "sweep.json").write_text(json.dumps({**index, "runs": {**index["runs"], identity: entry}}))
    with pytest.raises(ValueError, match=r"sst2/s1/glora/0: g1s0, g1s0new"):
        write_report(results)
    (results / "sweep.json").write_text(json.dumps(index))
    assert len(load_results(results).finished()) == 10
    for folder in results.iterdir():
        if folder.is_dir():
            (folder / "summary.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no run has finished yet"):
        write_report(results)


def test_a_variant_column_is_compared_with_its_partner_seed_by_seed(results):
    assert "Each variant column" not in markdown(load_results(results), {})
    index = json.loads((results / "sweep.json").read_text())
    index["axes"]["settings"].append("s1-2x")
    index["settings"]["s1-2x"] = {"note": "glora at R 16", "overrides": {"rule_options": {"rank": 16}}, "versus": "s1"}
    for identity, entry in [
        _run(results, "v0", [("s1-2x", 0)], "glora", 0.83),
        _run(results, "v1", [("s1-2x", 1)], "glora", 0.86),
        _run(results, "v2", [("s1-2x", 2)], "glora", status="interrupted"),
    ]:
        index["runs"][identity] = entry
    (results / "sweep.json").write_text(json.dumps(index))
    md = markdown(load_results(results), {})
    assert '(overrides {"rule_options": {"rank": 16}}; a variant of `s1`)' in md
    # The variant column holds one federated rule: nothing to rank, nothing bold.
    assert "| glora | 0.8200 ± 0.0200 (3) | **0.7100 ± 0.0141** (2) | 0.8450 ± 0.0212 (2) |" in md
    section = _section(md, "## Each variant column against the column it varies, seed by seed")
    # Seeds 0 and 1 (seed 2 was interrupted). Against s1's glora (0.80, 0.82): +0.03, +0.04 ->
    # mean 0.035, sample std 0.0070711, ahead on both. Against s1's fedit (0.79, 0.85): +0.04,
    # +0.01 -> mean 0.025, std 0.0212132. The centralized run shares one seed only: left out.
    assert "| variant | against column | glora | fedit |" in section
    assert (
        "| s1-2x: glora | s1 | +0.0350 [-0.0285, +0.0985] tie (2; ahead on 2) | +0.0250 [-0.1656, +0.2156] tie "
        "(2; ahead on 2) |" in section
    )
    assert "centralized" not in section


def test_majority_line_is_the_most_frequent_label_of_the_scored_split():
    from pathlib import Path

    import numpy as np

    from glora.data.glue import load_glue
    from glora.experiments.statistics import majority_score
    from glora.experiments.sweep_results import load_results

    res = load_results(Path(__file__).resolve().parents[1] / "results" / "sweeps" / "data-heterogeneity")
    labels = np.array([r["label"] for r in load_glue("sst2", "validation")])
    assert majority_score(res, "sst2", "iid", "accuracy") == pytest.approx(np.bincount(labels).max() / len(labels))
    assert majority_score(res, "cola", "iid", "matthews_correlation") == 0.0  # a constant prediction


def test_the_gate_names_a_table_that_cannot_rank_and_ranks_nothing_in_it():
    """CoLA under the old protocol: FedIT at MCC 0 under IID, the majority class's score."""
    from pathlib import Path

    from glora.experiments.render.report import gate, markdown
    from glora.experiments.sweep_results import load_results

    res = load_results(Path(__file__).resolve().parents[1] / "results" / "sweeps" / "data-heterogeneity")
    assert gate(res, "sst2")[0] is True
    passes, words = gate(res, "cola")
    assert passes is False and "not informative" in words and "fedit 0.0000" in words
    cola = markdown(res, {}).split("## cola")[1].split("\n## ")[0]
    assert "**" not in cola.split("| rule |")[1].split("\n\n")[0]  # no cell bolded as best


def test_rules_at_the_majority_class_are_named_in_words():
    """The old protocol's tables: on CoLA every federated rule sits at MCC 0 (the majority
    class's score) in every setting; on SST-2 under IID none does, at alpha 0.1 several."""
    from pathlib import Path

    from glora.experiments.render.report import markdown
    from glora.experiments.statistics import at_majority, final_stat, majority_score
    from glora.experiments.sweep_results import load_results

    res = load_results(Path(__file__).resolve().parents[1] / "results" / "sweeps" / "data-heterogeneity")
    assert at_majority(res, "sst2", "iid", "accuracy") == []
    low = at_majority(res, "sst2", "alpha-0.1", "accuracy")
    majority = majority_score(res, "sst2", "alpha-0.1", "accuracy")
    for rule in res.axis("rules"):
        stat = final_stat(res, "sst2", "alpha-0.1", rule, "accuracy")
        assert (rule in low) == (abs(stat.mean - majority) <= 0.01)
    assert "centralized" not in low and "ffa-lora" in low
    assert "fedit" in at_majority(res, "cola", "iid", "matthews_correlation")
    md = markdown(res, {})
    assert f"alpha-0.1: {', '.join(low)}" in md.split("## sst2")[1].split("\n## ")[0]


def test_a_regressions_chance_line_is_the_constant_predictions_correlation(tmp_path):
    """STS-B has no majority class: always predicting the mean label scores Pearson 0 by the
    runs' own metric code, and a rule near 0 is named as sitting there."""
    from glora.experiments.statistics import at_majority, majority_score
    from glora.experiments.sweep_results import load_results

    root = tmp_path / "stsb"
    index = {"axes": {"tasks": ["stsb"], "settings": ["iid"], "rules": ["fedit", "centralized"]}, "runs": {}}
    for identity, rule, pearson in (("a", "fedit", 0.004), ("b", "centralized", 0.8)):
        folder = root / identity
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"task": "stsb", "rule": rule, "eval_split": "validation"}))
        (folder / "metrics.jsonl").write_text("")
        (folder / "summary.json").write_text(json.dumps({"final": {"pearson": pearson}, "main_metric": "pearson"}))
        index["runs"][identity] = {"labels": [{"task": "stsb", "setting": "iid", "rule": rule, "seed": 0}]}
    (root / "sweep.json").write_text(json.dumps(index))
    res = load_results(root)
    assert majority_score(res, "stsb", "iid", "pearson") == 0.0
    assert at_majority(res, "stsb", "iid", "pearson") == ["fedit"]
