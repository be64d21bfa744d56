"""GLUE tasks: what each one is, reading its splits, and tokenising them once (cached on disk).

Rows are plain dicts with the Hugging Face ``glue`` field names and label ids (see
``shared/data/README.md``), whether they come from the offline copy or the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from glora.cache import default_cache_dir
from glora.data.jsonl import read_jsonl
from glora.data.paths import DATA_ENV, data_dir_candidates, default_data_dir

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task as this package uses it.

    ``num_labels`` is 1 for a regression task (STS-B), whose labels are floats.
    ``hub`` is the (path, config) for ``datasets.load_dataset``; ``hub_splits`` maps this
    package's split names to the hub's where they differ (MNLI's validation is
    ``validation_matched``). ``local_splits`` are the splits present in the offline copy.
    """

    name: str
    folder: str
    text_fields: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    label_names: tuple[str, ...]
    hub: tuple[str, str]
    local_splits: tuple[str, ...] = SPLITS
    hub_splits: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2


_HUB = "nyu-mll/glue"  # the hub's current id of the dataset formerly named "glue"

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "sst2", ("sentence",), 2, ("accuracy",), "accuracy", ("negative", "positive"), (_HUB, "sst2")),
        TaskSpec(
            "mrpc",
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            ("f1", "accuracy"),
            "f1",
            ("not_equivalent", "equivalent"),
            (_HUB, "mrpc"),
        ),
        TaskSpec(
            "cola",
            "cola",
            ("sentence",),
            2,
            ("matthews_correlation",),
            "matthews_correlation",
            ("unacceptable", "acceptable"),
            (_HUB, "cola"),
        ),
        TaskSpec(
            "rte",
            "rte",
            ("sentence1", "sentence2"),
            2,
            ("accuracy",),
            "accuracy",
            ("entailment", "not_entailment"),
            (_HUB, "rte"),
        ),
        TaskSpec(
            "stsb", "stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "pearson", (), (_HUB, "stsb")
        ),
        TaskSpec(
            "qnli",
            "qnli",
            ("question", "sentence"),
            2,
            ("accuracy",),
            "accuracy",
            ("entailment", "not_entailment"),
            (_HUB, "qnli"),
            local_splits=("validation",),
            note="evaluation only offline: its train split is missing from the local copy",
        ),
        TaskSpec(
            "wnli",
            "wnli",
            ("sentence1", "sentence2"),
            2,
            ("accuracy",),
            "accuracy",
            ("not_entailment", "entailment"),
            (_HUB, "wnli"),
        ),
        TaskSpec(
            "mnli_subset",
            "mnli_subset",
            ("premise", "hypothesis"),
            3,
            ("accuracy",),
            "accuracy",
            ("entailment", "neutral", "contradiction"),
            (_HUB, "mnli"),
            hub_splits={"validation": "validation_matched"},
            note="a 3,000/7,469 subset of MNLI offline; not comparable with GLUE MNLI scores; "
            "--data-source hub loads the full MNLI (validation = validation_matched)",
        ),
        TaskSpec(
            "qqp_subset",
            "qqp_subset",
            ("question1", "question2"),
            2,
            ("f1", "accuracy"),
            "f1",
            ("not_duplicate", "duplicate"),
            (_HUB, "qqp"),
            note="a 2,000/7,600 subset of QQP offline; not comparable with GLUE QQP scores; "
            "--data-source hub loads the full QQP",
        ),
    )
}

# "mnli" and "qqp" name the subsets: the full datasets are not available offline.
ALIASES: dict[str, str] = {"mnli": "mnli_subset", "qqp": "qqp_subset"}


def task_names() -> list[str]:
    """Every accepted task name, aliases included."""
    return sorted([*GLUE_TASKS, *ALIASES])


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The spec of ``task`` (a name or alias; "mnli" and "qqp" mean the subsets)."""
    if isinstance(task, TaskSpec):
        return task
    name = ALIASES.get(task, task)
    if name not in GLUE_TASKS:
        raise ValueError(
            f"unknown GLUE task {task!r}; choose one of: {', '.join(task_names())} "
            f"('mnli' and 'qqp' mean mnli_subset and qqp_subset)"
        )
    return GLUE_TASKS[name]


def glue_file(task: str | TaskSpec, split: str, data_dir: Path | str | None = None) -> Path:
    """Path of one split's file in a data directory (``<data_dir>/glue/<folder>/<split>.jsonl.gz``)."""
    spec = get_task(task)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return root / "glue" / spec.folder / f"{split}.jsonl.gz"


def load_glue(task: str, split: str, data_dir: Path | str | None = None, source: str = "local") -> list[dict[str, Any]]:
    """All rows of one split of a GLUE task, in file order.

    ``source="local"`` reads the offline copy under ``data_dir`` (default: see
    :func:`glora.data.paths.default_data_dir`); ``source="hub"`` loads the same split
    through the ``datasets`` library (needs network).
    """
    spec = get_task(task)
    if source not in ("local", "hub"):
        raise ValueError(f"unknown source {source!r}; choose 'local' (offline files) or 'hub' (datasets library)")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {spec.name}; choose one of: {', '.join(SPLITS)}")
    if source == "hub":
        return _load_hub(spec, split)
    if split not in spec.local_splits:
        raise ValueError(
            f"{spec.name} has no {split!r} split in the offline data (only: {', '.join(spec.local_splits)}); "
            f"{spec.note}. --data-source hub loads it online."
        )
    path = glue_file(spec, split, data_dir)
    if not path.is_file():
        if data_dir is not None:
            where = f"the data directory given: {Path(data_dir)}"
        elif os.environ.get(DATA_ENV):
            where = f"${DATA_ENV} = {os.environ[DATA_ENV]}"
        else:
            where = "the default places: " + ", ".join(str(p) for p in data_dir_candidates())
        raise ValueError(
            f"GLUE {spec.name} {split}: expected the file {path}, which does not exist. "
            f"The data directory was looked up in {where}. "
            f"Point ${DATA_ENV} (or the data_dir option, --data-dir on the command line) at a folder "
            f"with the layout glue/<task>/<split>.jsonl.gz (see shared/data/README.md), "
            f"or load the split online with --data-source hub."
        )
    remedy = (
        "the file is damaged; restore it from the offline copy (its verify.py checks every file), "
        "or load the split online with --data-source hub"
    )
    return list(read_jsonl(path, (*spec.text_fields, "label"), remedy))


def _load_hub(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    import datasets  # a dependency; imported here because it is slow to import

    path, config = spec.hub
    ds = datasets.load_dataset(path, config, split=spec.hub_splits.get(split, split))
    rows = []
    for row in ds:
        row = dict(row)
        if spec.label_names:
            row["label_text"] = spec.label_names[row["label"]]
        rows.append(row)
    return rows


def texts(task: str | TaskSpec, rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The task's text fields as columns: one list per field (1 or 2), each of len(rows)."""
    spec = get_task(task)
    try:
        return [[row[f] for row in rows] for f in spec.text_fields]
    except KeyError as e:
        raise ValueError(
            f"a row lacks the field {e.args[0]!r} that {spec.name} reads ({', '.join(spec.text_fields)}); "
            f"were these rows loaded for another task?"
        ) from None


def labels_tensor(task: str | TaskSpec, rows: Sequence[dict[str, Any]]) -> Tensor:
    """Labels as a tensor of shape (len(rows),): float32 for regression, else int64 class ids."""
    spec = get_task(task)
    try:
        values = [row["label"] for row in rows]
    except KeyError:
        raise ValueError(f"a {spec.name} row has no 'label'; only labelled splits can be encoded") from None
    if spec.is_regression:
        return torch.tensor(values, dtype=torch.float32)
    labels = torch.tensor(values, dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_labels):
        raise ValueError(f"{spec.name} labels must be class ids in 0..{spec.num_labels - 1}")
    return labels


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: unpadded token ids (each at most max_length long) and labels (n,)."""

    input_ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, indices: Sequence[int] | np.ndarray) -> Encoded:
        """The examples at ``indices`` (e.g. one client's part of a partition)."""
        idx = [int(i) for i in indices]
        return Encoded([self.input_ids[i] for i in idx], self.labels[torch.tensor(idx, dtype=torch.long)])


_CACHE_FORMAT = 1  # bump when the cached content changes meaning


def _cache_key(spec: TaskSpec, columns: list[list[str]], tokenizer: Any, max_length: int, split: str) -> str:
    content = hashlib.sha256(json.dumps(columns, ensure_ascii=False).encode("utf-8")).hexdigest()
    parts = [
        _CACHE_FORMAT,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "truncation_side", "right"),
        spec.name,
        split,
        max_length,
        len(columns[0]),
        content,
    ]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:20]


def tokenize_task(
    task: str | TaskSpec,
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    *,
    split: str = "",
    cache_dir: Path | str | None = None,
) -> Encoded:
    """Tokenise rows (pairs as pairs, truncated to ``max_length``, no padding), cached on disk.

    The cache file under ``cache_dir`` (default ``$GLORA_CACHE_DIR`` or ``./cache``) is keyed
    by the tokenizer (name_or_path, vocabulary size), task, split, max_length, row count and
    a hash of the texts, so a second call on the same data does no tokenising. ``split`` only
    names the file and enters the key; the text hash already tells splits apart.
    Labels are read from the rows on every call (cheap), so only token ids are cached.
    """
    spec = get_task(task)
    if len(rows) == 0:
        raise ValueError(f"no {spec.name} rows to tokenise")
    special = tokenizer.num_special_tokens_to_add(pair=spec.is_pair)
    if int(max_length) != max_length or max_length <= special:
        raise ValueError(
            f"max_length must be an integer above the {special} special tokens this tokenizer adds; got {max_length}"
        )
    labels = labels_tensor(spec, rows)
    columns = texts(spec, rows)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(spec, columns, tokenizer, int(max_length), split)
    path = root / "tokenized" / f"{spec.name}-{split or 'rows'}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            flat, offsets = z["flat"], z["offsets"]
        ids = [chunk.tolist() for chunk in np.split(flat, offsets[1:-1])]
        return Encoded(ids, labels)
    ids = tokenizer(*columns, truncation=True, max_length=int(max_length))["input_ids"]
    _save_ids(path, ids)
    return Encoded(ids, labels)


def _save_ids(path: Path, ids: list[list[int]]) -> None:
    """Write ragged ids as one flat array plus offsets; atomically, as runs may share the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, flat=flat, offsets=offsets)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def collate(input_ids_batch: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad a batch to its longest sequence.

    Returns input_ids (b, L) int64 and attention_mask (b, L) int64 with L the longest length;
    the mask comes from the lengths, so a pad id that is also a real token is harmless.
    """
    if len(input_ids_batch) == 0:
        raise ValueError("collate needs at least one sequence")
    seqs = [torch.tensor(list(s), dtype=torch.long) for s in input_ids_batch]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("collate got an empty sequence; every example needs at least one token")
    ids = pad_sequence(seqs, batch_first=True, padding_value=int(pad_id))
    mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0)
    return ids, mask
