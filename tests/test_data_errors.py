"""Damaged data files (issue #30): a truncated gzip, a line that is not JSON, an empty file,
each as one ValueError naming the file (and the line) and what to do, before any training:
the offline GLUE and SuperNI copies and the user's own files. Damaged copies of small real
files are built in tmp_path; shared/data itself is only read."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glora.data.dataset_files import read_splits
from glora.data.glue import glue_file, load_glue
from glora.data.paths import default_data_dir
from glora.data.superni import SuperNI

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "data" / "support_tickets.csv"
INSTRUCTIONS = ROOT / "examples" / "data" / "instructions.jsonl"


def lines_of(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode("utf-8").splitlines(keepends=True)


def truncate(path: Path) -> None:
    """Keep the first half of the bytes, as an interrupted download or copy leaves a file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def break_line(path: Path, line: int) -> None:
    """Cut the end off one line (1-based) of a gzip JSON Lines file: that line is no longer JSON."""
    lines = lines_of(path)
    lines[line - 1] = lines[line - 1][:-12] + "\n"
    path.write_bytes(gzip.compress("".join(lines).encode("utf-8")))


def glue_copy(tmp_path: Path, task: str = "wnli") -> Path:
    """A data directory holding a copy of one GLUE task's folder."""
    src = glue_file(task, "train").parent
    dst = tmp_path / "data" / "glue" / src.name
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the shared copy is read-only
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (truncate, r"the gzip stream ends early \(truncated file\) after line \d+; the file is damaged"),
        (lambda p: break_line(p, 17), r"line 17 is not valid JSON \(.+: column \d+\); the file is damaged"),
        (lambda p: p.write_bytes(b""), r"the file is empty \(no rows\)"),
        (lambda p: p.write_bytes(gzip.compress(b"\n\n")), r"the file is empty \(no rows\)"),
        (lambda p: p.write_bytes(b'{"sentence1": "a"}\n'), r"not a readable gzip file after line 0 \(Not a gzipped"),
    ],
)
def test_a_damaged_glue_file_is_one_error_naming_it_and_the_remedy(tmp_path, damage, words):
    data = glue_copy(tmp_path)
    path = glue_file("wnli", "train", data)
    damage(path)
    with pytest.raises(ValueError, match=words) as e:
        load_glue("wnli", "train", data)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "restore it from the offline copy (its verify.py checks every file)" in message
    assert "--data-source hub" in message


def test_a_glue_row_without_its_fields_names_the_line(tmp_path):
    data = glue_copy(tmp_path)
    path = glue_file("wnli", "validation", data)
    lines = lines_of(path)
    lines[2] = '{"sentence1": "only one sentence", "label": 0}\n'
    path.write_bytes(gzip.compress("".join(lines).encode()))
    with pytest.raises(ValueError, match=r"validation\.jsonl\.gz: line 3 has no field 'sentence2' \(its fields: "):
        load_glue("wnli", "validation", data)
    lines[2] = "[1, 2]\n"
    path.write_bytes(gzip.compress("".join(lines).encode()))
    with pytest.raises(ValueError, match=r"line 3 is a JSON list, not an object"):
        load_glue("wnli", "validation", data)


def superni_copy(tmp_path: Path) -> tuple[Path, str]:
    """A data directory with the real SuperNI metadata and one real training and one real test
    task (their files copied); returns it and the training task's name."""
    shared = default_data_dir() / "superni"
    train = (shared / "splits" / "train_tasks.txt").read_text().split()[0]
    test = (shared / "splits" / "test_tasks.txt").read_text().split()[0]
    root = tmp_path / "data" / "superni"
    (root / "tasks").mkdir(parents=True)
    (root / "splits").mkdir()
    shutil.copyfile(shared / "task_metadata.jsonl.gz", root / "task_metadata.jsonl.gz")
    for name in (train, test):
        shutil.copyfile(shared / "tasks" / f"{name}.jsonl.gz", root / "tasks" / f"{name}.jsonl.gz")
    (root / "splits" / "train_tasks.txt").write_text(train + "\n")
    (root / "splits" / "test_tasks.txt").write_text(test + "\n")
    return tmp_path / "data", train


def test_damaged_superni_files_are_named_with_their_line(tmp_path):
    data_dir, train = superni_copy(tmp_path)
    assert len(SuperNI(data_dir).instances(train)) > 0  # the copy reads, before any damage
    task_file = data_dir / "superni" / "tasks" / f"{train}.jsonl.gz"
    truncate(task_file)
    with pytest.raises(ValueError, match=rf"{train}\.jsonl\.gz: the gzip stream ends early \(truncated file\)"):
        SuperNI(data_dir).instances(train)
    task_file.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{train}\.jsonl\.gz: the file is empty"):
        SuperNI(data_dir).instances(train)

    metadata = data_dir / "superni" / "task_metadata.jsonl.gz"
    break_line(metadata, 17)
    with pytest.raises(ValueError, match=r"task_metadata\.jsonl\.gz: line 17 is not valid JSON .*verify\.py"):
        SuperNI(data_dir).tasks  # noqa: B018 (reading the property reads the file)

    shutil.copyfile(default_data_dir() / "superni" / "task_metadata.jsonl.gz", metadata)
    (data_dir / "superni" / "splits" / "test_tasks.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"test_tasks\.txt: the file is empty \(no task names\)"):
        SuperNI(data_dir).test_tasks  # noqa: B018


def test_damaged_own_files_are_one_error_naming_the_file_and_line(tmp_path, capfd):
    rows = INSTRUCTIONS.read_text().splitlines(keepends=True)
    assert len(rows) > 17
    truncated = tmp_path / "truncated.jsonl.gz"
    data = gzip.compress("".join(rows * 20).encode())
    truncated.write_bytes(data[: len(data) // 2])
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text("".join([*rows[:16], rows[16][:-12] + "\n", *rows[17:]]))
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(gzip.compress(bad_line.read_bytes()))
    bad_json = tmp_path / "rows.json"
    bad_json.write_text('[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n')
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(TICKETS.read_text() + "one,two,three,four,five\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = [
        (truncated, r"the gzip stream ends early \(truncated file\)"),
        (bad_line, r"line 17 is not valid JSON \(.+: column \d+\)"),
        (bad_gz, r"line 17 is not valid JSON"),
        (bad_json, r"line 3 is not valid JSON \(Expecting ',' delimiter: column 16\)"),
        (bad_csv, r"could not read it as csv \(ParserError: .* in line 362, saw 5\)"),
        (empty, r"the file is empty \(no rows\)"),
    ]
    for path, words in cases:
        with pytest.raises(ValueError, match=words) as e:
            read_splits(str(path))
        assert str(path) in str(e.value) and "the file is damaged; re-download or fix it" in str(e.value)
        assert "\n" not in str(e.value)
    # The datasets library logs a file it cannot read: the error above is the only report.
    assert "Failed to" not in capfd.readouterr().err


def test_the_cli_prints_one_error_line_and_no_traceback_before_training(tmp_path):
    data = glue_copy(tmp_path)
    break_line(glue_file("wnli", "train", data), 17)
    own = tmp_path / "tickets.csv.gz"
    packed = gzip.compress(TICKETS.read_bytes())
    own.write_bytes(packed[: len(packed) // 2])
    # COLUMNS: rich wraps the message at 80 columns when stderr is not a terminal.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "2000"}
    tiny = ["--rounds", "1", "--clients", "2", "--local-steps", "1", "--threads", "1", "--no-progress"]
    for args, words in (
        (
            ["--task", "wnli", "--data-dir", str(data)],
            f"error: {glue_file('wnli', 'train', data)}: line 17 is not valid JSON",
        ),
        (
            ["--dataset", str(own), "--text-column", "text", "--label-column", "label"],
            f"error: --dataset {own}: the gzip stream ends early (truncated file)",
        ),
    ):
        out = tmp_path / f"run-{len(args)}"
        proc = subprocess.run(
            [sys.executable, "-m", "glora.cli", "run", *args, *tiny, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
        assert proc.stderr.startswith(words) and "Traceback" not in proc.stderr + proc.stdout
        assert not (out / "config.json").exists()  # refused before the run began
