"""Instruction tuning on the user's own data (``--dataset`` with prompt and response columns).

``glora run --dataset x.jsonl --prompt-column instruction [--input-column input]
--response-column output`` fine-tunes a causal language model (SmolLM2 by default,
``--backbone`` any causal model) with the loss on the response tokens only. Prompts use
SuperNI's layout (the instruction as the definition, then ``Input: ... Output:``; see
glora.data.superni_prompts), fitted to ``--max-length`` minus the target budget
(``--superni-max-target-length``); a row whose input does not fit even without its
instruction is skipped and counted. Evaluation: greedy generation (at most
``--superni-max-new-tokens``) on the validation split, ROUGE-L (x 100, against the response)
and exact match. Partitions: ``--partition-column`` (e.g. a task or category: each value's
rows to one client), Dirichlet skew over the ``--label-column`` categories (``--alpha``), or
IID (the default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from rich.console import Console
from torch import nn

from glora.data.dataset_files import read_splits, require_columns
from glora.data.partition import dirichlet_scheme, iid_partition, natural_partition
from glora.data.rouge import rouge_l
from glora.data.superni_prompts import (
    EncodedInstance,
    Prompt,
    SegmentIds,
    collate_for_training,
    encode_target,
    fit_prompt,
)
from glora.models.causal import load_causal_lm, resolve_causal_lm
from glora.models.export import ExportInfo, hub_id
from glora.models.generate import generate
from glora.tasks.base import TaskFamily, base_kwargs, lora_settings
from glora.tasks.classification import check_dataset_options
from glora.tasks.superni import SUPERNI_DEFAULTS

if TYPE_CHECKING:  # annotations only: the tasks sit below the federation layer
    from glora.federation.config import RunConfig

METRICS = ("rougeL", "exact_match")


class InstructionTask(TaskFamily):
    """The user's instructions and responses on a causal language model."""

    name = "instructions"
    has_head = False
    # SuperNI's causal-model defaults (SmolLM2, q/v projections, the budget of this machine).
    defaults: ClassVar[dict[str, Any]] = dict(SUPERNI_DEFAULTS)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        check_dataset_options(cfg, {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column})
        if cfg.alpha is not None and not cfg.label_column:
            raise ValueError(
                "--alpha skews the clients' categories: give --label-column with a category column "
                "(or --partition-column for a natural split, or leave the split IID)"
            )
        if cfg.metric and cfg.metric not in METRICS:
            raise ValueError(f"--metric {cfg.metric!r}: instruction tuning reports {', '.join(METRICS)}")

    def __init__(self, cfg: RunConfig, console: Console | None = None) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        self.main_metric = cfg.metric or METRICS[0]
        splits = read_splits(cfg.dataset, cfg.validation_fraction, cfg.dataset_config, cfg.dataset_revision)
        require_columns(
            splits,
            prompt_column=cfg.prompt_column,
            input_column=cfg.input_column,
            response_column=cfg.response_column,
            label_column=cfg.label_column,
            partition_column=cfg.partition_column,
        )
        self.backbone_path = resolve_causal_lm(cfg.backbone)
        self.model, self.tokenizer = load_causal_lm(self.backbone_path, base=base_kwargs(self.cfg))
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.lora = lora_settings(cfg)
        rows = splits.train
        if cfg.max_train_examples is not None:
            keep = np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.max_train_examples]
            rows = [rows[i] for i in sorted(keep)]
        self.train, kept, skipped_train = self._encode("train", rows)
        self.groups = (
            [rows[i][cfg.partition_column or cfg.label_column] for i in kept]
            if (cfg.partition_column or cfg.label_column)
            else None
        )
        evaluation = splits.validation[: cfg.max_eval_examples] if cfg.max_eval_examples else splits.validation
        self.eval, _, skipped_eval = self._encode("validation", evaluation)
        self.skipped = {"train": skipped_train, "validation": skipped_eval}
        if not self.eval:
            raise ValueError(f"no validation row fits --max-length {cfg.max_length}: raise it")
        if cfg.clients > len(self.train):
            raise ValueError(f"--clients {cfg.clients} is more than the {len(self.train)} training rows that fit")
        self.num_train = len(self.train)
        (console or Console(stderr=True)).print(
            f"[dim]instructions: {self.num_train} training and {len(self.eval)} validation rows from {cfg.dataset}; "
            f"rows whose input does not fit --max-length {cfg.max_length} skipped: {skipped_train} training, "
            f"{skipped_eval} validation[/dim]"
        )

    def _encode(self, split: str, rows: list[dict[str, Any]]) -> tuple[list[EncodedInstance], list[int], int]:
        """Encoded rows, the indices of those kept, and how many were skipped (too long)."""
        cfg = self.cfg
        budget = cfg.max_length - cfg.superni_max_target_length
        segments = SegmentIds(self.tokenizer)
        out, kept = [], []
        for i, r in enumerate(rows):
            instruction, response = r[cfg.prompt_column], r[cfg.response_column]
            for column, value in ((cfg.prompt_column, instruction), (cfg.response_column, response)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{split} row {i}: column {column!r} is empty or not text ({value!r})")
            text = str(r[cfg.input_column] or "") if cfg.input_column else ""
            prompt = fit_prompt(self.tokenizer, Prompt(instruction.strip(), (), text.strip()), budget, segments)
            if prompt is None:
                continue
            target = encode_target(self.tokenizer, response, cfg.superni_max_target_length)
            out.append(EncodedInstance(str(i), split, tuple(prompt), tuple(target), (response,)))
            kept.append(i)
        return out, kept, len(rows) - len(out)

    def partition(self) -> list[np.ndarray]:
        cfg = self.cfg
        if cfg.partition_column:
            return natural_partition(np.asarray(self.groups, dtype=object).astype(str), cfg.clients, cfg.seed)
        if cfg.alpha is not None:
            names = sorted({str(g) for g in self.groups})
            ids = np.array([names.index(str(g)) for g in self.groups], dtype=np.int64)
            split = dirichlet_scheme(cfg.partition_scheme)
            return split(ids, cfg.clients, cfg.alpha, cfg.seed, min_size=cfg.min_client_examples)
        return iid_partition(self.num_train, cfg.clients, cfg.seed)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return collate_for_training([self.train[i] for i in indices], self.pad_id)

    def log_label_prior(self, indices: np.ndarray) -> torch.Tensor:
        raise ValueError("instruction tuning has no class labels (the logit-adjusted loss needs them)")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """ROUGE-L (x 100) and exact match (x 100, after stripping) of greedy generations."""
        predictions = generate(
            model,
            self.tokenizer,
            [list(x.prompt) for x in self.eval],
            max_new_tokens=self.cfg.superni_max_new_tokens,
            batch_size=self.cfg.eval_batch_size,
        )
        refs = [x.references[0] for x in self.eval]
        return {
            "rougeL": float(np.mean([rouge_l(p, [r]) for p, r in zip(predictions, refs, strict=True)])),
            "exact_match": 100.0
            * float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, refs, strict=True)])),
            "skipped/train_rows": float(self.skipped["train"]),
            "skipped/validation_rows": float(self.skipped["validation"]),
        }

    def fresh_model(self) -> nn.Module:
        return load_causal_lm(self.backbone_path, base=base_kwargs(self.cfg))[0]

    @property
    def export_info(self) -> ExportInfo:
        return ExportInfo(hub_id(self.cfg.backbone), "CAUSAL_LM")
