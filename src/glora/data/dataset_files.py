"""The user's own data: a file, a folder of split files, or a hub id, read with the
``datasets`` library (its csv, json and parquet builders read offline, gzip included), as
transformers' ``run_glue.py`` / ``run_clm.py`` examples read theirs.

- a file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, each optionally ``.gz``):
  its rows are the training data, and a seeded ``validation_fraction`` of them (seed 0,
  whatever the run's seed, so every run is scored on the same rows) the validation split;
- a folder holding ``train.<ext>`` and ``validation.<ext>`` (or ``test.<ext>``);
- anything else is a hub id, loaded with ``datasets.load_dataset`` (online users).
Every problem is a ValueError naming the path, column or value, before any model loads.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glora.data.jsonl import DAMAGED, read_jsonl

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_SEED = 0


@dataclass(frozen=True)
class Splits:
    """Rows (dicts of column -> value) of the training and validation splits, and the columns."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    columns: list[str]
    source: str


def file_kind(path: Path) -> str:
    """The extension that decides the reader (".csv", ...), a trailing ".gz" set aside."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in BUILDERS:
        raise ValueError(
            f"--dataset {path}: unknown file type {kind or '(none)'!r}; give a {', '.join(BUILDERS)} file "
            "(gzip allowed: .csv.gz, ...) or a folder holding train.<ext> and validation.<ext>"
        )
    return kind


def _read_file(path: Path) -> list[dict[str, Any]]:
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, set_verbosity, set_verbosity_error

    disable_progress_bar()
    set_verbosity_error()
    kind = file_kind(path)
    extra = {"delimiter": "\t"} if kind == ".tsv" else {}
    # The builders log a file they cannot read before raising: the ValueError below says it once.
    set_verbosity(logging.CRITICAL)
    try:
        ds = load_dataset(BUILDERS[kind], data_files={"train": str(path)}, split="train", **extra)
    except Exception as e:  # pyarrow, pandas, gzip and json raise many kinds; each becomes one line
        check_damage(path, kind)
        raise ValueError(f"--dataset {path}: could not read it as {kind[1:]} ({first_cause(e)}); {DAMAGED}") from None
    finally:
        set_verbosity(logging.ERROR)
    return ds.to_list()


def check_damage(path: Path, kind: str) -> None:
    """ValueError for what the datasets library's error would not say, or not name the line
    of: a truncated or corrupt gzip stream, an empty file, a line of JSON that does not parse.
    Returns when it finds none of these."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    blank = True
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                blank = blank and not chunk.strip()
    except EOFError:
        raise ValueError(f"--dataset {path}: the gzip stream ends early (truncated file); {DAMAGED}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"--dataset {path}: not a readable gzip file ({e}); {DAMAGED}") from None
    if blank:
        raise ValueError(f"--dataset {path}: the file is empty (no rows); {DAMAGED}")
    if kind == ".json":
        # One JSON document (an array of rows) or JSON Lines: a document that parses up to
        # "Extra data" on its second line is JSON Lines, checked line by line below.
        with opener(path, "rt", encoding="utf-8") as f:
            try:
                json.load(f)
                return
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":
                    raise ValueError(
                        f"--dataset {path}: line {e.lineno} is not valid JSON ({e.msg}: column {e.colno}); {DAMAGED}"
                    ) from None
            except UnicodeDecodeError:
                raise ValueError(f"--dataset {path}: not UTF-8 text; {DAMAGED}") from None
    if kind in (".json", ".jsonl"):
        for _ in read_jsonl(path, remedy=DAMAGED):  # read only for the error it raises on a bad line
            pass


def first_cause(e: BaseException) -> str:
    """The error at the root of ``e``'s chain, on one line: the datasets library wraps the
    reader's own error (pandas' names the CSV line) in a DatasetGenerationError."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _split_file(path: Path) -> tuple[Path, Path]:
    """train.<ext> and validation.<ext> (or test.<ext>) of a folder."""

    def find(stem: str) -> Path | None:
        hits = sorted(p for p in path.iterdir() if p.name.split(".")[0] == stem and p.is_file())
        return hits[0] if hits else None

    train = find("train")
    evaluation = find("validation") or find("test")
    if train is None or evaluation is None:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ValueError(
            f"--dataset {path}: a folder must hold train.<ext> and validation.<ext> (or test.<ext>); it holds {present}"
        )
    return train, evaluation


def looks_like_a_path(text: str) -> bool:
    """Whether a --dataset value that does not exist was meant as a local path (an extension,
    a leading ./ ../ / ~, or more than one slash), rather than a hub id (org/name)."""
    return (
        text.startswith((".", "/", "~"))
        or any(text.lower().removesuffix(".gz").endswith(ext) for ext in BUILDERS)
        or text.count("/") > 1
    )


def read_splits(source: str, validation_fraction: float = 0.1, config: str = "", revision: str = "") -> Splits:
    """The training and validation rows of ``source`` (see the module doc)."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path)
        if not 0 < validation_fraction < 1:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
        if len(rows) < 2:
            raise ValueError(f"--dataset {path}: {len(rows)} rows; a single file needs at least 2 to split")
        import numpy as np

        order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
        n_val = max(1, round(validation_fraction * len(rows)))
        val = set(order[:n_val].tolist())
        train = [r for i, r in enumerate(rows) if i not in val]
        validation = [rows[i] for i in sorted(val)]
    elif path.is_dir():
        train_file, eval_file = _split_file(path)
        train, validation = _read_file(train_file), _read_file(eval_file)
    elif looks_like_a_path(source):
        raise ValueError(f"--dataset {source}: no such file or folder")
    else:
        train, validation = _read_hub(source, config, revision)
    if not train:
        raise ValueError(f"--dataset {source}: the training split has no rows")
    if not validation:
        raise ValueError(f"--dataset {source}: the validation split has no rows")
    return Splits(train, validation, list(train[0]), str(source))


def _read_hub(name: str, config: str, revision: str) -> tuple[list[dict], list[dict]]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ValueError(
            f"--dataset {name} is not a local file or folder, and the hub is off (HF_HUB_OFFLINE): "
            "pass a local path (a .csv/.jsonl/.parquet file or a folder of train/validation files)"
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config or None, revision=revision or None)
    except Exception as e:  # network and hub errors come in many kinds
        raise ValueError(
            f"--dataset {name} is not a local file or folder, and loading it from the hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline? pass a local path"
        ) from None
    evaluation = next((s for s in ("validation", "test") if s in ds), None)
    if "train" not in ds or evaluation is None:
        raise ValueError(f"--dataset {name}: the hub dataset has splits {list(ds)}; glora needs train and validation")
    return ds["train"].to_list(), ds[evaluation].to_list()


def require_columns(splits: Splits, **named: str) -> None:
    """ValueError for a named column (``option=column``) that the data does not have."""
    for option, column in named.items():
        if column and column not in splits.columns:
            raise ValueError(
                f"--{option.replace('_', '-')} {column!r}: no such column in {splits.source}; its columns are "
                f"{', '.join(splits.columns)}"
            )
