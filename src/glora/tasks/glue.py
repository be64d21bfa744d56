"""Sequence classification (and regression) on an encoder: the shared machinery
(:class:`ClassificationTask`: held-out slice, caps, tokenising, partitions, batches,
evaluation) and the GLUE tasks on it (:class:`GlueTask`). The user's own labelled data uses
the same base (glora.tasks.classification)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from glora.data import glue
from glora.data.metrics import compute_metrics
from glora.data.partition import dirichlet_scheme, iid_partition, label_buckets, natural_partition
from glora.models.backbones import encoder_config, load_classifier, resolve_backbone
from glora.models.device import to_device
from glora.models.export import ExportInfo, hub_id
from glora.tasks.base import TaskFamily, base_kwargs, lora_settings

if TYPE_CHECKING:  # annotations only: the tasks sit below the federation layer
    from glora.federation.config import RunConfig

# A training row's natural client (``--partition-column``), carried through the row filters.
GROUP = "_group"


class ClassificationTask(TaskFamily):
    """A classification (or regression) task on an encoder with a head, from rows that a
    subclass reads: ``spec`` says the text fields, labels and metrics; rows hold the text
    fields, an integer ``label`` (a float for regression) and, for a natural partition, the
    client key under :data:`GROUP`."""

    def __init__(
        self, cfg: RunConfig, spec: glue.TaskSpec, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.name = self.spec.name
        self.main_metric = self.spec.main_metric
        self.backbone_path = resolve_backbone(cfg.backbone)
        if cfg.eval_split == "heldout":
            # A fixed slice (seed 0 whatever the run's seed), so every run tunes on the same data.
            order = np.random.default_rng(0).permutation(len(train_rows))
            held = set(order[: cfg.heldout_examples].tolist())
            eval_rows = [train_rows[i] for i in sorted(held)]
            train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        elif cfg.eval_split != "validation":
            raise ValueError(f"--eval-split must be 'validation' or 'heldout', got {cfg.eval_split!r}")
        if cfg.max_train_examples is not None:
            keep = np.random.default_rng(cfg.seed).permutation(len(train_rows))[: cfg.max_train_examples]
            train_rows = [train_rows[i] for i in sorted(keep)]
        if cfg.max_eval_examples is not None:
            eval_rows = eval_rows[: cfg.max_eval_examples]
        if cfg.clients > len(train_rows):
            raise ValueError(f"--clients {cfg.clients} is more than the {len(train_rows)} training examples")
        self.groups = np.array([r[GROUP] for r in train_rows]) if train_rows and GROUP in train_rows[0] else None
        self.model, self.tokenizer = load_classifier(
            self.backbone_path, self.spec.num_labels, seed=cfg.seed, pooling=cfg.pooling, base=base_kwargs(cfg)
        )
        self.train = glue.tokenize_task(self.spec, train_rows, self.tokenizer, cfg.max_length, split="train")
        self.eval = glue.tokenize_task(self.spec, eval_rows, self.tokenizer, cfg.max_length, split="validation")
        self.num_train = len(self.train)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.segments = (
            self.spec.is_pair
            and "token_type_ids" in self.tokenizer.model_input_names
            and getattr(encoder_config(self.model), "type_vocab_size", 1) > 1
        )
        self.lora = lora_settings(cfg, ("classifier",))

    def partition(self) -> list[np.ndarray]:
        cfg = self.cfg
        if self.groups is not None:
            return natural_partition(self.groups, cfg.clients, cfg.seed)
        if cfg.alpha is None:
            return iid_partition(self.num_train, cfg.clients, cfg.seed)
        labels = self.train.labels.numpy()
        if self.spec.is_regression:
            labels = label_buckets(labels)
        split = dirichlet_scheme(cfg.partition_scheme)
        return split(labels, cfg.clients, cfg.alpha, cfg.seed, min_size=cfg.min_client_examples)

    def inputs(self, input_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch: padded ids, mask and, for sentence pairs on a backbone
        with segment embeddings (BERT), the segment ids the tokenizer would have given."""
        ids, mask = glue.collate(input_ids, self.pad_id)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.segments:
            is_sep = (ids == self.tokenizer.sep_token_id).long()
            before = torch.cumsum(is_sep, dim=1) - is_sep  # separators strictly before each position
            out["token_type_ids"] = (before > 0).long() * mask
        return out

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.inputs([self.train.input_ids[i] for i in indices])
        out["labels"] = self.train.labels[torch.as_tensor(indices)]
        return out

    def log_label_prior(self, indices: np.ndarray) -> torch.Tensor:
        """Laplace-smoothed (add one), so a class the client never saw has a finite log prior."""
        counts = torch.bincount(self.train.labels[torch.as_tensor(indices)], minlength=self.spec.num_labels)
        return torch.log((counts.double() + 1) / (counts.sum() + self.spec.num_labels)).float()

    @property
    def export_info(self) -> ExportInfo:
        labels = dict(enumerate(self.spec.label_names)) if self.spec.label_names else None
        return ExportInfo(hub_id(self.cfg.backbone), "SEQ_CLS", self.spec.num_labels, labels)

    def fresh_model(self) -> nn.Module:
        cfg = self.cfg
        return load_classifier(
            self.backbone_path, self.spec.num_labels, seed=cfg.seed, pooling=cfg.pooling, base=base_kwargs(cfg)
        )[0]

    @torch.no_grad()
    def eval_logits(self, model: nn.Module) -> torch.Tensor:
        """(n_eval, num_labels) float32 logits (regression: one column of scores) on the
        evaluation split, in its order."""
        return self._logits(model, self.eval.input_ids)

    @torch.no_grad()
    def _logits(self, model: nn.Module, input_ids: list[list[int]]) -> torch.Tensor:
        """(n, num_labels) float32 logits of the given examples, in their order; batches sorted
        by length so padding stays small."""
        model.eval()
        order = np.argsort([len(x) for x in input_ids], kind="stable")
        out = torch.empty(len(order), self.spec.num_labels, dtype=torch.float32)
        device = next(model.parameters()).device
        for start in range(0, len(order), self.cfg.eval_batch_size):
            idx = order[start : start + self.cfg.eval_batch_size]
            logits = model(**to_device(self.inputs([input_ids[i] for i in idx]), device)).logits
            out[torch.as_tensor(idx)] = logits.float().cpu()
        return out

    def evaluate_examples(self, model: nn.Module, indices: np.ndarray) -> dict[str, float]:
        """Metrics on the given training examples (a client's held-out share)."""
        logits = self._logits(model, [self.train.input_ids[i] for i in indices])
        preds = logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)
        return compute_metrics(self.spec, preds.numpy(), self.train.labels[torch.as_tensor(indices)].numpy())

    def predict(self, model: nn.Module) -> torch.Tensor:
        """(n_eval,) predicted labels (regression: scores) on the evaluation split, in its order."""
        logits = self.eval_logits(model)
        return logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics on the evaluation split."""
        return compute_metrics(self.spec, self.predict(model).numpy(), self.eval.labels.numpy())


class GlueTask(ClassificationTask):
    """A GLUE task, from the offline copy (--data-dir) or the hub."""

    reads_hub = True

    @classmethod
    def has_labels(cls, cfg: RunConfig) -> bool:
        return not glue.get_task(cfg.task).is_regression

    def __init__(self, cfg: RunConfig) -> None:
        spec = glue.get_task(cfg.task)
        if "train" not in spec.local_splits and cfg.data_source == "local":
            trainable = [t for t in glue.task_names() if "train" in glue.get_task(t).local_splits]
            raise ValueError(
                f"task {cfg.task!r} has no training split in the offline data ({spec.note or 'missing'}); "
                f"train on one of: {', '.join(trainable)}"
            )
        train_rows = glue.load_glue(cfg.task, "train", cfg.data_dir, source=cfg.data_source)
        eval_rows = glue.load_glue(cfg.task, "validation", cfg.data_dir, source=cfg.data_source)
        super().__init__(cfg, spec, train_rows, eval_rows)
