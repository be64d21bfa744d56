"""What the round loop needs from a task: a backbone, the clients' data, batches, an
evaluation, and what the export says. Every task family implements :class:`FederatedTask`
and declares, as class attributes and class methods, what the loop and the config checks
need to know before anything loads (:class:`TaskFamily`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from glora.models.export import ExportInfo
from glora.models.lora import LoraSettings
from glora.models.precision import loading_kwargs

if TYPE_CHECKING:  # annotations only: the tasks sit below the federation layer
    from glora.federation.config import RunConfig


class FederatedTask(Protocol):
    """A task as the round loop sees it."""

    name: str
    main_metric: str
    model: nn.Module
    lora: LoraSettings
    num_train: int

    def partition(self) -> list[np.ndarray]:
        """Indices of the training examples each client holds (a partition)."""

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """A training batch (model inputs and labels) of the given examples."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the evaluation split."""

    def log_label_prior(self, indices: np.ndarray) -> torch.Tensor:
        """(num_labels,) log of the label frequencies among the given training examples
        (classification tasks; the logit-adjusted loss shifts the logits by it)."""

    def fresh_model(self) -> nn.Module:
        """A new instance of the pretrained backbone (with its initial head), for export."""

    @property
    def export_info(self) -> ExportInfo:
        """What the exported adapter says of its base model, task type and labels."""


class TaskFamily:
    """What a task family declares before any data or model loads. Subclassed by every task.

    has_head: the model has a classification head (``--pooling`` and the head's learning
    rate apply); False for text generation.
    reads_hub: ``--data-source hub`` applies (the family can read its data from the hub).
    defaults: values of RunConfig fields this family sets when the user does not, with the
    value ``"rounds"`` for eval_every meaning "evaluate at the end only" (generation is slow).
    """

    has_head: ClassVar[bool] = True
    reads_hub: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """ValueError for options this family cannot run with (before loading anything)."""

    @classmethod
    def has_labels(cls, cfg: RunConfig) -> bool:
        """Whether the task's examples carry class labels (the logit-adjusted loss needs them)."""
        return False


def lora_settings(cfg: RunConfig, head_modules: tuple[str, ...] = ()) -> LoraSettings:
    """Where the run puts LoRA and how it scales it; ``head_modules`` train beside it."""
    return LoraSettings(
        target_modules=tuple(cfg.target_modules),
        alpha_per_rank=cfg.lora_alpha_per_rank,
        rslora=cfg.rslora,
        head_modules=head_modules,
    )


def base_kwargs(cfg: RunConfig) -> dict:
    """``from_pretrained`` arguments of the run's base dtype or quantization."""
    return loading_kwargs(cfg.dtype, cfg.load_in_4bit, cfg.load_in_8bit)
