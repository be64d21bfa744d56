"""SuperNI instruction tuning as a federated task: task heterogeneity.

Each client holds its own training tasks (one by default, FlexLoRA's protocol; several; or
every task of one category), drawn with the run's seed. A few instances of every client
task are held out for the "seen" score. The global model is scored by ROUGE-L of its greedy
generations on held-out test tasks that no client trained on ("unseen", the main metric),
per task and per category, and on the held-out instances of the clients' own tasks.

``--rounds 0`` scores the untuned backbone (the zero-shot reference); the centralized
reference is the rule ``centralized``, one client holding every client's training data.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from glora.data.rouge import score_tasks
from glora.data.superni import SuperNI, check_no_leakage, sample_client_tasks, sample_eval_tasks, split_instances
from glora.data.superni_prompts import (
    EncodedInstance,
    EncodedTask,
    PromptSettings,
    collate_for_training,
    encode_task,
)
from glora.models.causal import load_causal_lm, resolve_causal_lm
from glora.models.export import ExportInfo, hub_id
from glora.models.generate import generate
from glora.tasks.base import TaskFamily, base_kwargs, lora_settings

if TYPE_CHECKING:  # annotations only: the tasks sit below the federation layer
    from glora.federation.config import RunConfig

# Defaults that differ from the dataclass's (GLUE's): the SmolLM2 backbone with LoRA on its
# attention projections, clients split by task (no label skew), and a budget sized for this
# 2-core machine: 10 clients x 5 rounds x 5 steps of about 6.5 s (one core), plus one
# evaluation of about 4 min (README, "Instruction tuning on SuperNI";
# results/superni_defaults.md has the measurements and the learning-rate probe). Evaluation
# only at the end unless told otherwise: an evaluation is minutes of generation.
SUPERNI_DEFAULTS: dict[str, Any] = {
    "backbone": "smollm2",
    "pooling": "cls",  # no classification head; the inert values keep SuperNI identities
    "head_lr_ratio": 1.0,
    "target_modules": ("q_proj", "v_proj"),
    "alpha": None,
    "rounds": 5,
    "local_steps": 5,
    "batch_size": 4,
    "lr": 5e-4,
    "max_length": 256,
    "eval_batch_size": 16,
    "eval_ranks": False,
    "eval_every": "rounds",
}

# The unseen tasks are the same whatever the run's seed, so runs of different seeds (and
# rules) are scored on one test set; the seed varies the clients' tasks and training.
EVAL_TASK_SEED = 0


def named_tasks(data: SuperNI, text: str) -> list[str]:
    """The tasks of a comma-separated list, in order, without repeats; ValueError for an
    unknown name (with the closest known names)."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for name in names:
        data.task(name)
    return names


def task_lists(cfg: RunConfig, data: SuperNI, exclude: Collection[str] = ()) -> tuple[list[list[str]], list[str]]:
    """Each client's training tasks (drawn with the run's seed) and the unseen tasks to
    score (drawn with a fixed seed, spread over categories). The pools they are drawn from
    (--superni-train-tasks / --superni-test-tasks, else the official lists) must not share
    a task: ValueError naming it. ``exclude``: tasks left out of both draws."""
    train_pool = named_tasks(data, cfg.superni_train_tasks) or data.train_tasks
    test_pool = named_tasks(data, cfg.superni_test_tasks) or data.test_tasks
    check_no_leakage(train_pool, test_pool)
    left_out = set(exclude)
    clients = sample_client_tasks(
        data.categories(t for t in train_pool if t not in left_out),
        cfg.clients,
        cfg.superni_tasks_per_client,
        cfg.superni_by_category,
        cfg.seed,
    )
    unseen = sample_eval_tasks(
        data.categories(t for t in test_pool if t not in left_out), cfg.superni_eval_tasks, EVAL_TASK_SEED
    )
    return clients, unseen


def check_superni_config(cfg: RunConfig) -> None:
    """What can be checked before reading data or loading a model."""
    if cfg.alpha is not None:
        raise ValueError(
            f"--alpha {cfg.alpha} does not apply to superni: its clients are split by task "
            "(--superni-tasks-per-client, --superni-by-category), not by label"
        )
    for name, value, least in (
        ("superni-tasks-per-client", cfg.superni_tasks_per_client, 1),
        ("superni-eval-instances", cfg.superni_eval_instances, 1),
        ("superni-seen-instances", cfg.superni_seen_instances, 0),
        ("superni-max-new-tokens", cfg.superni_max_new_tokens, 1),
        ("eval-batch-size", cfg.eval_batch_size, 1),
    ):
        if value < least:
            raise ValueError(f"--{name} must be >= {least}, got {value}")
    if cfg.superni_eval_tasks is not None and cfg.superni_eval_tasks < 1:
        raise ValueError(f"--superni-eval-tasks must be >= 1 (or 'all'), got {cfg.superni_eval_tasks}")


class SuperNITask(TaskFamily):
    """SuperNI on a causal language model: see the module docstring.

    Attributes beyond the :class:`~glora.tasks.glue.FederatedTask` protocol:
    client_tasks (each client's training tasks), eval_tasks (the unseen tasks scored),
    train / seen / unseen (encoded instances), skipped (instances of each task left out
    because even the bare input does not fit the prompt budget) and tasks_left_out (tasks
    with no instance that fits, left out of the draws).
    """

    name = "superni"
    main_metric = "rougeL"
    has_head = False
    defaults = SUPERNI_DEFAULTS

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        check_superni_config(cfg)

    def __init__(self, cfg: RunConfig, console: Console | None = None) -> None:
        check_superni_config(cfg)
        self.cfg = cfg
        console = console or Console(stderr=True)
        self.settings = PromptSettings(cfg.superni_num_examples, cfg.max_length, cfg.superni_max_target_length)
        data = SuperNI(cfg.data_dir)
        task_lists(cfg, data)  # unknown names and leakage are refused before the model loads

        self.backbone_path = resolve_causal_lm(cfg.backbone)
        self.model, self.tokenizer = load_causal_lm(self.backbone_path, base=base_kwargs(self.cfg))
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.lora = lora_settings(cfg)

        self.skipped: dict[str, int] = {}
        self.categories: dict[str, str] = {}
        encoded: dict[str, EncodedTask] = {}
        # A task none of whose inputs fits the prompt budget (at max_length 256: 6 of the 687
        # training tasks, 1 of the 103 test tasks) would leave a one-task client without data
        # or an unseen task without a score: such tasks are left out of the pools and both
        # lists drawn again, until every drawn task has data. With --superni-by-category a
        # client holds many tasks and simply skips such a one.
        self.tasks_left_out: list[str] = []
        while True:
            self.client_tasks, self.eval_tasks = task_lists(cfg, data, exclude=self.tasks_left_out)
            drawn = [t for tasks in self.client_tasks for t in tasks]
            for task in (t for t in [*drawn, *self.eval_tasks] if t not in encoded):
                encoded[task] = encode_task(data, task, self.tokenizer, self.settings)
            empty = [
                t for t in [*([] if cfg.superni_by_category else drawn), *self.eval_tasks] if not encoded[t].instances
            ]
            if not empty:
                break
            self.tasks_left_out += sorted(empty)

        self.train: list[EncodedInstance] = []
        self.seen: list[EncodedInstance] = []
        self.parts: list[np.ndarray] = []
        for client, tasks in enumerate(self.client_tasks):
            indices: list[int] = []
            for task in tasks:
                enc = encoded[task]
                self.skipped[task], self.categories[task] = enc.num_skipped, enc.category
                if not enc.instances:
                    continue  # by category: the client trains on its other tasks
                held = min(cfg.superni_seen_instances, len(enc.instances) - 1)
                train, seen = split_instances(enc.instances, held, seed=cfg.seed)
                indices.extend(range(len(self.train), len(self.train) + len(train)))
                self.train.extend(train)
                self.seen.extend(seen)
            if not indices:
                raise ValueError(
                    f"client {client}: no instance of its tasks {tasks} fits --max-length {cfg.max_length} "
                    f"(prompt budget {self.settings.prompt_budget} tokens); raise --max-length"
                )
            self.parts.append(np.array(indices, dtype=np.int64))
        self.num_train = len(self.train)

        self.unseen: list[EncodedInstance] = []
        for task in self.eval_tasks:
            enc = encoded[task]
            self.skipped[task], self.categories[task] = enc.num_skipped, enc.category
            # Test tasks list their official evaluation instances first.
            self.unseen.extend(enc.instances[: cfg.superni_eval_instances])
        self._describe(console)

    def _describe(self, console: Console) -> None:
        cfg, s = self.cfg, self.settings
        train_skipped = sum(self.skipped[t] for ts in self.client_tasks for t in ts)
        eval_skipped = sum(self.skipped[t] for t in self.eval_tasks)
        console.print(
            f"[dim]SuperNI: {len(self.client_tasks)} clients holding {sum(map(len, self.client_tasks))} training "
            f"tasks ({self.num_train} instances, {len(self.seen)} held out as seen); {len(self.eval_tasks)} unseen "
            f"tasks x up to {cfg.superni_eval_instances} instances ({len(self.unseen)}). Inputs longer than the "
            f"{s.prompt_budget}-token prompt budget are skipped: {train_skipped} in the training tasks, "
            f"{eval_skipped} in the unseen tasks.[/dim]"
        )
        if self.tasks_left_out:
            console.print(
                f"[yellow]tasks left out of the draw (no input fits --max-length {cfg.max_length}): "
                f"{', '.join(self.tasks_left_out)}[/yellow]"
            )

    def partition(self) -> list[np.ndarray]:
        return [p.copy() for p in self.parts]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return collate_for_training([self.train[i] for i in indices], self.pad_id)

    def fresh_model(self) -> nn.Module:
        return load_causal_lm(self.backbone_path, base=base_kwargs(self.cfg))[0]

    @property
    def export_info(self) -> ExportInfo:
        return ExportInfo(hub_id(self.cfg.backbone), "CAUSAL_LM")

    def _scores(self, items: Sequence[EncodedInstance], predictions: Sequence[str]):
        preds: dict[str, list[str]] = {}
        refs: dict[str, list[tuple[str, ...]]] = {}
        for x, p in zip(items, predictions, strict=True):
            preds.setdefault(x.task, []).append(p)
            refs.setdefault(x.task, []).append(x.references)
        return score_tasks(preds, refs, self.categories)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """ROUGE-L (x 100) of greedy generations: "rougeL" over the unseen tasks (the mean of
        the per-task means), "unseen/<task>", "category/<category>" (unseen), "rougeL_seen"
        and "seen/<task>" on the clients' held-out instances, and "skipped/...": the instances
        of the run's tasks whose input does not fit the prompt budget, and the tasks left out
        of the draws because none of theirs does."""
        cfg = self.cfg
        items = self.unseen + self.seen
        # One call for both sets: generation sorts all prompts by length into batches.
        predictions = generate(
            model,
            self.tokenizer,
            [list(x.prompt) for x in items],
            max_new_tokens=cfg.superni_max_new_tokens,
            batch_size=cfg.eval_batch_size,
        )
        unseen = self._scores(self.unseen, predictions[: len(self.unseen)])
        out = {"rougeL": unseen.overall}
        out.update({f"unseen/{t}": v for t, v in unseen.per_task.items()})
        out.update({f"category/{c}": v for c, v in unseen.per_category.items()})
        if self.seen:
            seen = self._scores(self.seen, predictions[len(self.unseen) :])
            out["rougeL_seen"] = seen.overall
            out.update({f"seen/{t}": v for t, v in seen.per_task.items()})
        out["skipped/train_instances"] = float(sum(self.skipped[t] for ts in self.client_tasks for t in ts))
        out["skipped/unseen_instances"] = float(sum(self.skipped[t] for t in self.eval_tasks))
        out["skipped/tasks_left_out"] = float(len(self.tasks_left_out))
        return out
