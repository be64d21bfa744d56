"""What a node does with a train message: load the task and model (once per process),
train its partition from the server's readout with the in-process simulation's client step
(:func:`~glora.federation.client.train_client`), and reply.

Rules that keep factors or the head on the client (FedSA-LoRA, the local reference) keep
them in the node's ``context.state``, which Flower carries from round to round. A node keeps
what it trained in a round only once the server has accepted that round's update: it holds
it as pending, and the next train message says (``kept-round``) the last round whose update
of this client the server took into its state, as the in-process driver keeps a client's own
state only from the rounds that aggregated it. A rejected update is dropped on both sides.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from glora.aggregation import Rule, get_rule
from glora.federation.client import adapted_model, train_client
from glora.federation.config import RunConfig
from glora.federation.engine import ClientState, client_layout
from glora.flower.records import decode_base, decode_factors, decode_head, encode, sent_rank
from glora.models.lora import AdaptedModel
from glora.tasks import FederatedTask, build_task

OWN = "glora-own"  # the key of the client's own factors and head in context.state
log = logging.getLogger("flwr.glora")  # a child of Flower's logger: in the node's log, the worker's too
OWN_ROUND = "glora-own-round"  # the round that trained it
PENDING, PENDING_ROUND = "glora-own-pending", "glora-own-pending-round"  # trained, not yet accepted

# The loaded task and model of the last run config, with an adapter for every rank that run
# has (as the in-process driver's one model). Flower's simulation engine reuses its worker
# processes across messages, and so does a node worker (glora.flower.node_worker), so a
# node's later messages skip loading; the deployment engine's own ClientApp process serves
# one message and loads every time. Another run's config replaces it: one backbone in memory.
_LOADED: dict[str, tuple[FederatedTask, AdaptedModel, list[np.ndarray]]] = {}


def load(cfg: RunConfig, rule: Rule, rank: int) -> tuple[FederatedTask, AdaptedModel, list[np.ndarray]]:
    """The task, a model with an adapter of ``rank`` (and of every rank of the run), and
    every client's examples."""
    key = cfg.identity()
    held = _LOADED.get(key)
    if held is None or rank not in held[1].ranks:  # another run, or a node declared a rank of its own
        ranks = {*cfg.client_ranks(), rank, *(held[1].ranks if held else ())}
        held = None  # the old model goes before the new one loads: never two backbones at once
        _LOADED.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        torch.set_num_threads(cfg.threads)
        task = build_task(cfg)
        parts, _ = client_layout(cfg, task, rule)
        model = adapted_model(task, cfg, sorted(ranks))
        _LOADED[key] = (task, model, parts)
        log.info(
            "loaded the task and a model of %s with ranks %s in %.1f s",
            cfg.backbone,
            model.ranks,
            time.perf_counter() - t0,
        )
    return _LOADED[key]


def _commit_own(state: RecordDict, kept_round: int) -> None:
    """Make the pending own state the node's own if the server accepted that round's update;
    drop it otherwise."""
    if PENDING not in state:
        return
    if int(state[PENDING_ROUND]["round"]) == kept_round:
        state[OWN] = state[PENDING]
        state[OWN_ROUND] = state[PENDING_ROUND]
    del state[PENDING]
    del state[PENDING_ROUND]


def train_reply(content: RecordDict, state: RecordDict, cfg: RunConfig, partition: int) -> RecordDict:
    """The content of the reply to one train message (its ``content``) for the node of
    ``partition`` (``state``: the node's context.state, updated in place)."""
    rule = get_rule(cfg.rule, **cfg.rule_options)
    conf = content["config"]
    server_round, client = int(conf["server-round"]), int(conf["client"])
    if not rule.pooled and client != partition:
        raise ValueError(f"the server sent the round of client {client} to the node of partition {partition}")
    _commit_own(state, int(conf.get("kept-round", 0)))
    arrays = content["arrays"]
    rank = sent_rank(arrays)
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
        state[PENDING] = encode(update.own.factors, update.own.head)
        state[PENDING_ROUND] = ConfigRecord({"round": server_round})
    # The round of the own state it trained from (0: none), for the server to compare with its own record.
    own_round = int(state[OWN_ROUND]["round"]) if OWN in state and OWN_ROUND in state else 0
    metrics = MetricRecord({"num-examples": len(parts[client]), "train-loss": update.loss, "own-round": own_round})
    return RecordDict({"arrays": encode(update.factors, update.head), "metrics": metrics})


def serve_request(request: tuple) -> tuple[dict, dict]:
    """A node worker's answer to a forwarded train message (see
    :mod:`glora.flower.node_worker`): the reply's content and the node's new state, packed."""
    from glora.flower.client_app import node_identity
    from glora.flower.node_worker import pack, unpack

    t0 = time.perf_counter()
    run_config, node_config, packed, packed_state = request
    node = node_identity(run_config, node_config)
    content, state = unpack(packed), unpack(packed_state)
    reply = train_reply(content, state, node.cfg, node.partition)
    conf = content["config"]
    log.info("round %s, client %s: answered in %.1f s", conf["server-round"], conf["client"], time.perf_counter() - t0)
    return pack(reply), pack(state)
