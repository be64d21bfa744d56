"""Super-NaturalInstructions (SuperNI v2, default English track): tasks, instances, splits,
and the task-heterogeneity partitioners.

Layout (``<data dir>/superni``, see shared/data/README.md): one gzip JSON Lines file per
task under ``tasks/``, ``task_metadata.jsonl.gz`` (definition, positive examples,
categories) and ``splits/{train,test}_tasks.txt`` (687 training and 103 held-out test tasks
of the official default split). Test tasks keep their official evaluation instances first.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, TypeVar

from glora.data.jsonl import read_jsonl
from glora.data.paths import default_data_dir

REMEDY = "the file is damaged; restore it from the offline copy (its verify.py checks every file)"


@dataclass(frozen=True)
class Example:
    """A positive example of a task's definition: one input and its output."""

    input: str
    output: str


@dataclass(frozen=True)
class TaskInfo:
    """One task's metadata. SuperNI gives each task here exactly one category."""

    name: str
    split: str
    category: str
    definition: str
    positive_examples: tuple[Example, ...]


@dataclass(frozen=True)
class Instance:
    """One instance: its input and the acceptable reference outputs (ROUGE-L takes the best)."""

    id: str
    task: str
    input: str
    outputs: tuple[str, ...]


def check_no_leakage(train_tasks: Iterable[str], test_tasks: Iterable[str]) -> None:
    """Refuse a run whose held-out test tasks include a training task."""
    shared = sorted(set(train_tasks) & set(test_tasks))
    if shared:
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise ValueError(
            f"task {shared[0]}{more} is both a training and a test task: unseen-task scores would be "
            "leaked; remove it from one of the two lists"
        )


class SuperNI:
    """Read-only access to the SuperNI copy under ``<data_dir>/superni``.

    The split lists are checked for leakage when read. Instances whose references are all
    empty (14 training instances in this copy, e.g. removing the vowels of "IIe") cannot
    be scored and teach only an end-of-sequence token, so they are left out and counted in
    ``num_empty_dropped``.
    """

    def __init__(self, data_dir: Path | str | None = None) -> None:
        self.root = Path(data_dir if data_dir is not None else default_data_dir()) / "superni"
        if not (self.root / "task_metadata.jsonl.gz").exists():
            raise ValueError(
                f"no SuperNI data at {self.root} (task_metadata.jsonl.gz is missing): "
                "set GLORA_DATA_DIR to the folder that holds superni/ (shared/data)"
            )
        self.num_empty_dropped: dict[str, int] = {}

    @cached_property
    def tasks(self) -> dict[str, TaskInfo]:
        """Every task's metadata, by name."""
        out = {}
        fields = ("task_name", "split", "categories", "definition", "positive_examples")
        for row in read_jsonl(self.root / "task_metadata.jsonl.gz", fields, REMEDY):
            out[row["task_name"]] = TaskInfo(
                name=row["task_name"],
                split=row["split"],
                category=row["categories"][0],
                # Tk-Instruct's convention: a task with several definitions uses the first.
                definition=row["definition"][0].strip(),
                positive_examples=tuple(
                    Example(str(e["input"]).strip(), str(e["output"]).strip()) for e in row["positive_examples"]
                ),
            )
        return out

    def _read_list(self, split: str) -> list[str]:
        path = self.root / "splits" / f"{split}_tasks.txt"
        names = path.read_text(encoding="utf-8").split()
        if not names:
            raise ValueError(f"{path}: the file is empty (no task names); {REMEDY}")
        for name in names:
            self.task(name)
        return names

    @cached_property
    def train_tasks(self) -> list[str]:
        """The training tasks of the official default split present here (687)."""
        return self._read_list("train")

    @cached_property
    def test_tasks(self) -> list[str]:
        """The held-out (unseen) test tasks present here (103), checked against the training tasks."""
        names = self._read_list("test")
        check_no_leakage(self.train_tasks, names)
        return names

    def task(self, name: str) -> TaskInfo:
        """A task's metadata; an unknown name gets the closest known names as a hint."""
        try:
            return self.tasks[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.tasks), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown SuperNI task {name!r}{hint}: task names are listed in {self.root / 'splits'}"
            ) from None

    def categories(self, names: Iterable[str]) -> dict[str, str]:
        """Task name -> category, for the given tasks."""
        return {name: self.task(name).category for name in names}

    def task_file(self, name: str) -> Path:
        self.task(name)
        return self.root / "tasks" / f"{name}.jsonl.gz"

    def content_hash(self, name: str) -> str:
        """A digest of everything a prompt of this task is built from (metadata and instances)."""
        h = hashlib.sha256(repr(self.task(name)).encode())
        h.update(self.task_file(name).read_bytes())
        return h.hexdigest()[:16]

    def instances(self, name: str, limit: int | None = None) -> list[Instance]:
        """The task's instances in file order (test tasks: the official evaluation ones first)."""
        out, dropped = [], 0
        for row in read_jsonl(self.task_file(name), ("id", "input", "output"), REMEDY):
            outputs = tuple(o for o in row["output"] if o.strip())
            if not outputs:
                dropped += 1
                continue
            out.append(Instance(row["id"], name, row["input"], outputs))
            if limit is not None and len(out) >= limit:
                break
        self.num_empty_dropped[name] = dropped
        return out


class _OfTask(Protocol):
    @property
    def task(self) -> str: ...


T = TypeVar("T", bound=_OfTask)


def split_instances(instances: Sequence[T], num_held_out: int, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held_out) instances of one task (raw or encoded), for "seen"-task evaluation.

    The held-out draw depends on the seed and the task's name only, so a task keeps the
    same held-out instances whichever client holds it.
    """
    tasks = {x.task for x in instances}
    if len(tasks) > 1:
        raise ValueError(f"split the instances of one task at a time, got {len(tasks)} tasks: {sorted(tasks)[:3]}")
    if not 0 <= num_held_out < len(instances):
        raise ValueError(
            f"cannot hold out {num_held_out} of {len(instances)} instances: hold out at least 0 "
            "and leave at least one to train on"
        )
    order = list(range(len(instances)))
    random.Random(f"{seed}-{instances[0].task}").shuffle(order)
    held = set(order[:num_held_out])
    return (
        [x for i, x in enumerate(instances) if i not in held],
        [x for i, x in enumerate(instances) if i in held],
    )


def sample_client_tasks(
    task_categories: Mapping[str, str],
    num_clients: int,
    tasks_per_client: int = 1,
    by_category: bool = False,
    seed: int = 0,
) -> list[list[str]]:
    """The training tasks each client holds: task heterogeneity as the partitioner.

    task_categories: training task -> category (``SuperNI.categories(data.train_tasks)``).
    Default: ``tasks_per_client`` distinct tasks per client, no task on two clients (one
    task each is FlexLoRA's protocol). ``by_category``: each client holds every training task
    of one category, the categories drawn without replacement.
    """
    if num_clients < 1 or tasks_per_client < 1:
        raise ValueError(f"need num_clients >= 1 and tasks_per_client >= 1, got {num_clients}, {tasks_per_client}")
    rng = random.Random(seed)
    if by_category:
        if tasks_per_client != 1:
            raise ValueError("by_category gives each client all tasks of one category: leave tasks_per_client at 1")
        by_cat: dict[str, list[str]] = {}
        for task in sorted(task_categories):
            by_cat.setdefault(task_categories[task], []).append(task)
        if num_clients > len(by_cat):
            raise ValueError(f"{num_clients} clients but only {len(by_cat)} categories: use fewer clients")
        return [by_cat[c] for c in rng.sample(sorted(by_cat), num_clients)]
    need = num_clients * tasks_per_client
    if need > len(task_categories):
        raise ValueError(
            f"{num_clients} clients x {tasks_per_client} tasks needs {need} distinct training tasks "
            f"but only {len(task_categories)} are available"
        )
    drawn = rng.sample(sorted(task_categories), need)
    return [sorted(drawn[i * tasks_per_client : (i + 1) * tasks_per_client]) for i in range(num_clients)]


def sample_eval_tasks(task_categories: Mapping[str, str], num_tasks: int | None, seed: int = 0) -> list[str]:
    """Held-out tasks to evaluate on, spread over the categories (round-robin) so that a small
    sample still fills the per-category table. ``None`` keeps every task."""
    if num_tasks is None or num_tasks >= len(task_categories):
        return sorted(task_categories)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1 (or None for all), got {num_tasks}")
    rng = random.Random(seed)
    queues: dict[str, list[str]] = {}
    for task in sorted(task_categories):
        queues.setdefault(task_categories[task], []).append(task)
    for q in queues.values():
        rng.shuffle(q)
    order = sorted(queues)
    rng.shuffle(order)
    picked: list[str] = []
    while len(picked) < num_tasks:
        for c in order:
            if queues[c] and len(picked) < num_tasks:
                picked.append(queues[c].pop())
    return sorted(picked)
