"""`glora table RUN...`: one row per run folder with the numbers of its files, unfinished runs
marked, and a zero-shot run (no training, no loss) shown rather than crashing the table."""

from __future__ import annotations

import json

from glora.experiments.render.runs_table import runs_markdown


def _folder(root, name, config, rows, summary=None):
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _row(rnd, loss, acc=None, by_rank=None):
    row = {"round": rnd, "train_loss": loss, "round_seconds": 10.0, "bytes_up": 2 * 2**20}
    if acc is not None:
        row["eval"] = {"accuracy": acc}
    if by_rank:
        row["eval_by_rank"] = {k: {"accuracy": v} for k, v in by_rank.items()}
    return row


def test_rows_hold_the_run_files_numbers(tmp_path):
    cfg = {"rule": "glora", "ranks": "2,4", "lr": 1e-3, "rounds": 2}
    done = _folder(
        tmp_path,
        "done",
        cfg,
        [_row(1, 0.6), _row(2, 0.4, 0.81, {"4": 0.8, "2": 0.75})],
        {"main_metric": "accuracy", "wall_seconds": 123.4},
    )
    half = _folder(tmp_path, "half", {**cfg, "rule": "fedit", "ranks": "8"}, [_row(1, 0.5, 0.7)])
    zero = _folder(
        tmp_path,
        "zero",
        {**cfg, "rounds": 0},
        [_row(0, None, 0.5) | {"bytes_up": 0}],
        {"main_metric": "accuracy", "wall_seconds": 5.0},
    )
    lines = runs_markdown([done, half, zero, tmp_path / "missing"]).splitlines()
    assert len(lines) == 5  # header, separator, three runs (the folder without files is left out)
    assert lines[2] == (
        "| done | glora | 2,4 | 0.001 |  | r2: 0.810 | 2: 0.750, 4: 0.800 | - | 0.400 | 2/2 | 123 | 2.00 |"
    )
    assert "| 1/2 (unfinished) | 10 |" in lines[3] and "r1: 0.700" in lines[3]
    assert lines[4].startswith("| zero | glora |") and "| - | 0/0 | 5 | 0.00 |" in lines[4]


def test_options_column_names_what_differs_from_a_plain_run(tmp_path):
    base = {"rule": "glora", "ranks": "8", "lr": 1e-3, "rounds": 1}
    rows = [_row(1, 0.5, 0.7)]
    old = _folder(tmp_path, "old", base, rows)  # saved before pooling and logit_adjustment existed
    new = _folder(
        tmp_path,
        "new",
        {**base, "rule_options": {"threshold": 0.3, "consensus": "energy"}, "pooling": "mean", "logit_adjustment": 1.0},
        rows,
    )
    plain = _folder(tmp_path, "plain", {**base, "pooling": "cls", "logit_adjustment": 0.0}, rows)
    lines = runs_markdown([old, new, plain]).splitlines()
    assert "| 0.001 |  | r1: 0.700 |" in lines[2]
    assert "| 0.001 | consensus=energy, threshold=0.3, pooling=mean, logit_adjustment=1 | r1: 0.700 |" in lines[3]
    assert "| 0.001 |  | r1: 0.700 |" in lines[4]
