"""Client local training: a fresh AdamW each round (as the rules' reference code does),
a fixed number of steps over the client's shuffled data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from glora.models.device import to_device

BatchFn = Callable[[np.ndarray], dict[str, torch.Tensor]]


def batch_indices(indices: np.ndarray, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches drawn epoch by epoch from a seeded shuffle of ``indices``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(indices)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(indices), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def local_train(
    model: nn.Module,
    lora_params: Sequence[nn.Parameter],
    head_params: Sequence[nn.Parameter],
    make_batch: BatchFn,
    indices: np.ndarray,
    steps: int,
    batch_size: int,
    lr: float,
    head_lr: float,
    weight_decay: float,
    seed: int,
    on_step: Callable[[], None] | None = None,
    logit_bias: torch.Tensor | None = None,
    penalty: Callable[[], torch.Tensor | None] | None = None,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Train in place; returns the loss of every step. ``seed`` fixes batches and dropout.

    logit_bias: (num_labels,) added to the logits inside the loss only (the logit-adjusted
    loss; predictions stay unshifted), else the model's own loss.
    penalty: called at every step; a tensor it returns is added to the loss that is minimised
    (a rule's regulariser, e.g. HetLoRA's), None adds nothing. The losses returned leave it
    out, so that they stay comparable across rules.
    grad_accum_steps: micro-batches of ``batch_size`` per optimizer step (``steps`` counts
    optimizer steps; the effective batch is batch_size x grad_accum_steps); each step's loss
    is the mean over its micro-batches. max_grad_norm: clip the gradient norm of every step
    (None: no clipping). Returns one loss per optimizer step.
    """
    torch.manual_seed(seed)
    groups = [{"params": list(lora_params), "lr": lr}]
    if head_params:
        groups.append({"params": list(head_params), "lr": head_lr})
    for p in head_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    device = next(model.parameters()).device
    if logit_bias is not None:
        logit_bias = logit_bias.to(device)
    model.train()
    losses = []
    trained = [p for group in groups for p in group["params"]]
    batches = batch_indices(indices, batch_size, steps * grad_accum_steps, seed)
    for _ in range(steps):
        total = 0.0
        for _ in range(grad_accum_steps):
            batch = to_device(make_batch(next(batches)), device)
            if logit_bias is None:
                loss = model(**batch).loss
            else:
                labels = batch.pop("labels")
                loss = nn.functional.cross_entropy(model(**batch).logits + logit_bias, labels)
            extra = penalty() if penalty is not None else None
            objective = loss if extra is None else loss + extra
            (objective / grad_accum_steps if grad_accum_steps > 1 else objective).backward()
            total += float(loss.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / grad_accum_steps)
        if on_step is not None:
            on_step()
    model.eval()
    return losses
