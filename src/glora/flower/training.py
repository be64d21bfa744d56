"""What a node does with a train message: load the task and model (once per process),
train its partition from the server's readout with the in-process simulation's client step
(:func:`~glora.federation.client.train_client`), and reply.

Rules that keep factors or the head on the client (FedSA-LoRA, the local reference) keep
them in the node's ``context.state``, which Flower carries from round to round.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Message, MetricRecord, RecordDict

from glora.aggregation import Rule, get_rule
from glora.federation.client import adapted_model, train_client
from glora.federation.config import RunConfig
from glora.federation.engine import ClientState, client_layout
from glora.flower.records import decode_base, decode_factors, decode_head, encode
from glora.models.lora import AdaptedModel
from glora.tasks import FederatedTask, build_task

OWN = "glora-own"  # the key of the client's own factors and head in context.state

# Loaded tasks and models, by run config and rank. Flower's simulation engine reuses its
# worker processes across messages, so a node's second round skips loading; the deployment
# engine starts a fresh process per message and loads every time.
_LOADED: dict[tuple[str, int], tuple[FederatedTask, AdaptedModel, list[np.ndarray]]] = {}


def load(cfg: RunConfig, rule: Rule, rank: int) -> tuple[FederatedTask, AdaptedModel, list[np.ndarray]]:
    """The task, a model with a rank-``rank`` adapter, and every client's examples."""
    key = (cfg.identity(), rank)
    if key not in _LOADED:
        torch.set_num_threads(cfg.threads)
        task = build_task(cfg)
        parts, _ = client_layout(cfg, task, rule)
        _LOADED[key] = (task, adapted_model(task, cfg, [rank]), parts)
    return _LOADED[key]


def train_round(msg: Message, state: RecordDict, cfg: RunConfig, partition: int) -> Message:
    """The reply to one train message for the node of ``partition`` (``state``: the node's
    context.state)."""
    rule = get_rule(cfg.rule, **cfg.rule_options)
    conf = msg.content["config"]
    server_round, client = int(conf["server-round"]), int(conf["client"])
    if not rule.pooled and client != partition:
        raise ValueError(f"the server sent the round of client {client} to the node of partition {partition}")
    arrays = msg.content["arrays"]
    rank = next(arrays[k].numpy().shape[1] for k in arrays if k.startswith("B."))
    task, model, parts = load(cfg, rule, rank)
    scale = model.settings.scale(rank)
    # Every message sets the base weights: a reused model may hold another round's offsets.
    base = decode_base(arrays)
    model.set_base_offsets(base or {n: torch.zeros(s) for n, s in model.layer_shapes().items()})
    own = ClientState(decode_factors(state[OWN], scale), decode_head(state[OWN]), rank) if OWN in state else None
    update = train_client(
        model,
        task,
        cfg,
        rule,
        server_round,
        client,
        parts[client],
        decode_factors(arrays, scale),
        decode_head(arrays),
        own,
    )
    if update.own is not None:
        state[OWN] = encode(update.own.factors, update.own.head)
    metrics = MetricRecord({"num-examples": len(parts[client]), "train-loss": update.loss})
    return Message(RecordDict({"arrays": encode(update.factors, update.head), "metrics": metrics}), reply_to=msg)
