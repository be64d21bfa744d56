"""A client's side of a round, wherever it runs (this process or a Flower ClientApp): its model
(the backbone with an adapter per rank), its round (:func:`train_client`: start from what the
server sent, train, keep what the rule lets it keep) and the local training loop (a fresh
AdamW each round, as the rules' reference code does, for a fixed number of steps over the
client's shuffled data)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from glora.aggregation import Rule
from glora.aggregation.base import leading, within_rank
from glora.federation.config import RunConfig
from glora.federation.engine import ClientState, ClientUpdate, client_steps
from glora.lowrank import LowRank, random_gauge_matrix
from glora.models.device import resolve_device, to_device
from glora.models.lora import AdaptedModel, adapter_name
from glora.tasks import FederatedTask

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
    # The adapter of a rank is shared by its clients: a client whose training raised after a
    # backward (a skipped client) must not leave its gradients to the next one.
    opt.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    if logit_bias is not None:
        logit_bias = logit_bias.to(device)
    trained = [p for group in groups for p in group["params"]]
    batches = batch_indices(indices, batch_size, steps * grad_accum_steps, seed)
    model.train()
    losses = []
    try:
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
    finally:
        opt.zero_grad(set_to_none=True)
        model.eval()
    return losses


def adapted_model(task: FederatedTask, cfg: RunConfig, ranks: list[int]) -> AdaptedModel:
    """The task's backbone on the run's device, with a LoRA adapter for each of ``ranks``
    (and activation checkpointing with ``--gradient-checkpointing``). A quantized base is
    placed by its loader and not moved."""
    model = task.model
    device = resolve_device(cfg.device)
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        model = model.to(device)
    elif isinstance(getattr(model, "classifier", None), torch.nn.Module):
        model.classifier.to(device)  # a head glora added is not the loader's to place
    if cfg.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no gradient for the adapters to get one.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return AdaptedModel(model, task.lora, ranks)


def train_client(
    model: AdaptedModel,
    task: FederatedTask,
    cfg: RunConfig,
    rule: Rule,
    server_round: int,
    client: int,
    indices: np.ndarray,
    factors: Mapping[str, LowRank],
    head: Mapping[str, torch.Tensor],
    own: ClientState | None = None,
    on_step: Callable[[], None] | None = None,
) -> ClientUpdate:
    """One client's round, wherever it runs (this process or a Flower ClientApp): start from
    the server's readout ``factors`` and ``head`` (or the client's ``own`` where the rule keeps
    them personal), train locally with the run's seed formula and the rule's penalty, keep the
    rank the rule lets it keep, and return the update.

    A client that dropped trailing components in an earlier round (:meth:`Rule.pruned_rank`)
    holds its own factors at that smaller rank k: it uses the readout's leading k components
    (the rest of its rank-r adapter stays zero) and uploads at most k."""
    plan = rule.client_plan(server_round)
    r = next(iter(factors.values())).rank
    k = next(iter(own.factors.values())).rank if own is not None else r
    if own is not None:
        factors = {n: _keep_personal(f, own.factors[n], plan.personal) for n, f in factors.items()}
        if not plan.share_head:
            head = own.head
    start = {n: within_rank(f, k) for n, f in factors.items()}
    model.set_factors(r, start)
    model.set_head(r, head)
    params = model.activate(r, plan.train)
    adapter = adapter_name(r)

    def penalty() -> torch.Tensor | None:
        live = [(m.lora_B[adapter].weight[:, :k], m.lora_A[adapter].weight[:k]) for m in model.layers.values()]
        return rule.local_penalty(live)

    loss = local_train(
        model.peft,
        params,
        model.head_parameters(r),
        task.batch,
        indices,
        client_steps(cfg, rule, len(indices)),
        cfg.batch_size,
        cfg.lr,
        cfg.effective_head_lr(),
        cfg.weight_decay,
        seed=cfg.seed * 1_000_003 + server_round * 1009 + client,
        on_step=on_step,
        logit_bias=cfg.logit_adjustment * task.log_label_prior(indices) if cfg.logit_adjustment else None,
        penalty=penalty,
        grad_accum_steps=cfg.grad_accum_steps,
        max_grad_norm=cfg.max_grad_norm,
    )
    trained = {n: leading(f, k) for n, f in model.get_factors(r).items()}
    kept_rank = rule.pruned_rank({n: leading(f, k) for n, f in start.items()}, trained)
    trained = {n: leading(f, kept_rank) for n, f in trained.items()}
    new_head = model.get_head(r)
    keep = plan.personal or not plan.share_head or kept_rank < r
    kept = ClientState(trained, new_head, r) if keep else None
    if cfg.random_gauge:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + server_round * 31 + client)
        G = random_gauge_matrix(kept_rank, g).float()
        trained = {n: f.gauge(G) for n, f in trained.items()}
    return ClientUpdate(trained, new_head, float(np.mean(loss)), kept)


def _keep_personal(readout: LowRank, own: LowRank, personal: frozenset[str]) -> LowRank:
    """The readout with the client's own B and/or A where the rule keeps them on the client."""
    B = own.B if "B" in personal else readout.B
    A = own.A if "A" in personal else readout.A
    return LowRank(B, A, readout.scale)
