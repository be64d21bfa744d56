"""Any registered aggregation rule as a Flower strategy.

Each round, :meth:`RuleStrategy.configure_train` reads out each sampled node's adapter at
that node's rank (one Message per node: ranks differ), and
:meth:`RuleStrategy.aggregate_train` checks every reply and aggregates the good ones with the
rule, weighted by the example counts the nodes report (which must match the partitions the
server draws). A bad reply (an error, factors of the wrong shape, NaN, no or a false example
count) is left out of the round with a logged reason, by the run's failure policy
(:mod:`glora.federation.robust`): a round that loses too many nodes stops the run. The round's
arithmetic is the engine's (:mod:`glora.federation.engine`), as in the in-process driver: only
the transport differs.

Before the first round, :func:`discover_nodes` asks every node (a ``query`` message) for its
partition and rank, which live in the node's config where the server cannot see them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from glora.aggregation import get_rule
from glora.aggregation.base import FACTORS
from glora.federation.engine import (
    ClientState,
    ClientUpdate,
    ServerState,
    aggregate_round,
    readout,
    sample_clients,
)
from glora.federation.robust import settle_round
from glora.flower.records import check_update, encode, record_bytes, sent_rank
from glora.lowrank import LowRank

log = logging.getLogger("flwr.glora")  # a child of Flower's logger: shown by `flwr run --stream` and `flwr log`


@dataclass(frozen=True)
class NodeClient:
    """A node as the federation sees it: its Flower node id, its client index (the partition
    it trains on; 0 for the pooled client of the centralized reference) and its LoRA rank."""

    node_id: int
    client: int
    rank: int


class RuleStrategy(Strategy):
    """A glora rule (any name in ``glora.aggregation.RULES``) over Flower messages.

    nodes: one per client index 0..K-1. init: the round-1 adapter of every rank, per layer.
    head: the initial shared head. scale: the LoRA scale of a rank. state: the server state
    the rounds update (shared with the ServerApp, which evaluates and merges it). sizes: each
    client's example count, as the server knows it; a node that reports another is left out.
    on_client_error, max_failed_fraction, clip_update_norm: the run's failure and clipping
    policy (RunConfig), as in the in-process driver. on_updates: called with what each round
    aggregates (round, clients, updates, weights), after screening and clipping, as
    ``--record-updates`` stores them. query_timeout: how long a round waits for nodes that
    reconnected to say which partition they serve (:meth:`rebind`). round_offset: rounds done
    before Flower's round 1 (a resumed run): Flower's round t is the run's round t + offset.
    """

    def __init__(
        self,
        rule: str,
        nodes: Sequence[NodeClient],
        init: Mapping[int, Mapping[str, LowRank]],
        head: Mapping[str, Tensor],
        scale: Callable[[int], float],
        rule_options: Mapping[str, Any] | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        weighting: str = "examples",
        state: ServerState | None = None,
        sizes: Sequence[int] | None = None,
        on_client_error: str = "skip",
        max_failed_fraction: float = 0.5,
        clip_update_norm: float | None = None,
        on_updates: Callable[[int, list[int], list[ClientUpdate], list[float]], None] | None = None,
        query_timeout: float = 60.0,
        round_offset: int = 0,
    ) -> None:
        self.rule_name = rule
        self.rule = get_rule(rule, **(rule_options or {}))
        if sorted(n.client for n in nodes) != list(range(len(nodes))):
            raise ValueError(f"nodes must hold client indices 0..{len(nodes) - 1}, got {[n.client for n in nodes]}")
        for n in nodes:
            if n.rank not in init:
                raise ValueError(f"node {n.node_id} has rank {n.rank} but no initial adapter of that rank was given")
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.nodes = sorted(nodes, key=lambda n: n.client)
        self.init = init
        self.scale = scale
        self.fraction, self.seed, self.weighting = fraction, seed, weighting
        self.sizes = list(sizes) if sizes is not None else None
        self.on_client_error, self.max_failed_fraction = on_client_error, max_failed_fraction
        self.clip_update_norm = clip_update_norm
        self.on_updates = on_updates
        self.query_timeout = query_timeout
        self.round_offset = round_offset
        self.state = state if state is not None else ServerState(head=dict(head))
        self.shapes = {n: (f.B.shape[0], f.A.shape[1]) for n, f in next(iter(init.values())).items()}
        self.head_template = dict(head)
        self.sent: list[Message] = []
        self.sent_to: dict[int, NodeClient] = {}  # id(message) -> node, until message ids exist
        self.bytes_down: dict[int, int] = {}
        self.readouts: dict[int, dict[str, LowRank]] = {}
        # The last round whose update of each client went into the state (its own factors and
        # head among it): a node keeps what it trained in a round only if that round is named.
        self.kept: dict[int, int] = {}
        self.left_out_last: set[int] = set()  # the clients the last round left out
        self.round_started = 0.0
        #: The metrics row of the last round, or None when every reply was bad.
        self.last_record: dict[str, Any] | None = None

    # -- training -----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One Message per sampled node: its readout at its rank, the head, and (for rules that
        merge into the base weights) the base offsets so far."""
        server_round += self.round_offset
        self.round_started = time.perf_counter()
        self.last_record = None
        self.rebind(grid)
        st = self.state
        self.sent, self.sent_to, self.bytes_down, self.readouts = [], {}, {}, {}
        for i in sample_clients(len(self.nodes), server_round, self.fraction, self.seed):
            node = self.nodes[i]
            factors = readout(st, self.init, node.rank, self.scale(node.rank))
            cfg = ConfigRecord(
                {
                    **dict(config),
                    "server-round": server_round,
                    "client": node.client,
                    "kept-round": self.kept.get(node.client, 0),
                }
            )
            arrays = encode(factors, st.head, st.base_offsets)
            content = RecordDict({"arrays": arrays, "config": cfg})
            msg = Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
            self.sent.append(msg)
            self.sent_to[id(msg)] = node
            # What this message carries: the whole readout, the head, and the dense base offsets
            # (a node may have missed earlier merges), not the low-rank merge the in-process
            # driver counts.
            self.bytes_down[node.client] = record_bytes(arrays)
            self.readouts[node.client] = factors
        return self.sent  # a list: pushing fills in each message's id, which replies refer to

    def rebind(self, grid: Grid) -> None:
        """A node that connected since the last round (a restarted SuperNode gets a new id)
        takes over the partition it declares when the node that served it is gone or was
        left out of the last round, at the same rank; the partition is left out of the rounds
        until one does. (A killed node stays in Flower's list of nodes until it misses two
        heartbeats, up to a minute: waiting for that would cost its partition another round.)"""
        live = set(grid.get_node_ids())
        gone = {n.client for n in self.nodes if n.node_id not in live} | self.left_out_last
        new = sorted(live - {n.node_id for n in self.nodes})
        if not gone or not new:
            return
        try:
            found, _, _ = query_nodes(grid, new, self.query_timeout)
        except (ValueError, KeyError) as e:  # two claimants of a partition, a malformed reply: not this round
            log.warning("new nodes %s left unbound this round: %s", new, e)
            return
        for pid, (node_id, rank) in sorted(found.items()):
            if pid not in gone:
                continue
            old = self.nodes[pid]
            if rank != old.rank:
                log.warning(
                    "node %d declares partition %d at rank %d, not its rank %d: ignored", node_id, pid, rank, old.rank
                )
                continue
            self.nodes[pid] = NodeClient(node_id, pid, rank)
            why = "gone" if old.node_id not in live else "left out of the last round"
            log.info("partition %d: node %d takes over from node %d (%s)", pid, node_id, old.node_id, why)
            if pid in self.state.personal:
                log.warning(
                    "partition %d: its own factors stayed on node %d; it starts again from the readout",
                    pid,
                    old.node_id,
                )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule's aggregate of the good replies, screened as in the in-process driver
        (:func:`~glora.federation.robust.settle_round`: a round that loses more than
        ``max_failed_fraction`` of its nodes, or all of them, stops the run)."""
        server_round += self.round_offset
        by_id = {m.metadata.message_id: self.sent_to[id(m)] for m in self.sent}
        good: dict[int, tuple[ClientUpdate, float, int]] = {}
        left_out: dict[int, str] = {}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id)
            if node is None:
                log.warning("round %d: ignored a reply to no message of this round", server_round)
                continue
            if node.client in good or node.client in left_out:
                left_out[node.client] = "sent more than one reply"
                good.pop(node.client, None)
                continue
            try:
                good[node.client] = self._check(reply, node, server_round)
            except ValueError as e:
                left_out[node.client] = str(e)
        for node in (self.sent_to[id(m)] for m in self.sent):
            if node.client not in good and node.client not in left_out:
                left_out[node.client] = "no reply within the round's timeout"
        clients = sorted(good)
        settled = settle_round(
            server_round,
            len(self.sent),
            clients,
            [good[i][0] for i in clients],
            [good[i][1] for i in clients],
            left_out,
            self.on_client_error,
            self.max_failed_fraction,
            self.clip_update_norm,
            self.rule.client_plan(server_round).train & self.rule.client_plan(server_round).send,
        )
        self.left_out_last = set(settled.left_out)
        for client, update in zip(settled.clients, settled.updates, strict=True):
            if update.own is not None:
                self.kept[client] = server_round
        if self.on_updates is not None:  # what the rule aggregates (after screening and clipping)
            self.on_updates(server_round, settled.clients, settled.updates, settled.weights)
        for client, reason in sorted(settled.left_out.items()):
            log.warning(
                "round %d: left out client %d (node %d): %s", server_round, client, self.nodes[client].node_id, reason
            )
        bytes_down = sum(self.bytes_down.values())  # every message sent, answered or not
        bytes_up = sum(good[i][2] for i in settled.clients)
        record = (
            aggregate_round(
                self.rule,
                self.state,
                server_round,
                settled.clients,
                settled.updates,
                settled.weights,
                bytes_down,
                bytes_up,
                len(self.sent),
            )
            | settled.notes()
        )
        self.last_record = record
        metrics = MetricRecord({"train-loss": record["train_loss"], "clients": len(settled.clients)})
        return ArrayRecord(dict(self.state.head)), metrics

    def _check(self, reply: Message, node: NodeClient, server_round: int) -> tuple[ClientUpdate, float, int]:
        """A reply as (update, weight, the bytes of its arrays); ValueError with the reason it
        cannot be used."""
        if reply.has_error():
            raise ValueError(f"the node reported an error (code {reply.error.code}): {reply.error.reason}")
        content = reply.content
        if "arrays" not in content or "metrics" not in content:
            raise ValueError(f"the reply holds {sorted(content)}, not 'arrays' and 'metrics'")
        metrics = content["metrics"]
        if "num-examples" not in metrics:
            raise ValueError("no example count (metrics['num-examples'])")
        count = metrics["num-examples"]
        if not isinstance(count, int | float) or not math.isfinite(count) or count < 1:
            raise ValueError(f"example count {count!r} is not a positive number")
        if self.sizes is not None and count != self.sizes[node.client]:
            # The server draws the same partition: a node cannot inflate its weight.
            raise ValueError(f"example count {count!r} differs from its partition's {self.sizes[node.client]} examples")
        kept = self.kept.get(node.client, 0)
        if "own-round" in metrics and metrics["own-round"] != kept:
            # The node lost the state the server kept for it (restarted under the same node id).
            log.warning(
                "round %d: client %d (node %d) trained without its own state of round %d (it holds round %s's): "
                "its node restarted?",
                server_round,
                node.client,
                node.node_id,
                kept,
                metrics["own-round"],
            )
        loss = metrics.get("train-loss")
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            raise ValueError(f"training loss {loss!r} is missing or not finite")
        scale = self.scale(node.rank)
        rank = node.rank
        if self.rule.prunes:  # a node that pruned its rank uploads its leading components only
            rank = sent_rank(content["arrays"])
            if not 1 <= rank <= node.rank:
                raise ValueError(f"factors of rank {rank}; a node of rank {node.rank} may prune to 1..{node.rank}")
        factors, head = check_update(content["arrays"], rank, scale, self.shapes, self.head_template)
        plan = self.rule.client_plan(server_round)
        for factor in sorted(FACTORS - plan.train):
            # A factor the rule freezes this round must come back as sent (in the node's dtype).
            for n, f in factors.items():
                sent = getattr(self.readouts[node.client][n], factor)
                if not torch.equal(getattr(f, factor), sent.to(getattr(f, factor).dtype)):
                    raise ValueError(f"layer {n}: the rule freezes {factor} this round, but the node changed it")
        # What the node keeps for its next round, as the in-process client keeps it.
        keeps = plan.personal or not plan.share_head or rank < node.rank
        own = ClientState(factors, head, node.rank) if keeps else None
        weight = float(count) if self.weighting == "examples" else 1.0
        return ClientUpdate(factors, head, float(loss), own), weight, record_bytes(content["arrays"])

    # -- no federated evaluation: the server evaluates the global model itself ----------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        if len(self.nodes) <= 10:
            ranks = ", ".join(f"client {n.client} (node {n.node_id}): rank {n.rank}" for n in self.nodes)
        else:  # hundreds of virtual nodes: the count at each rank, not a line of 12,000 characters
            counts = Counter(n.rank for n in self.nodes)
            ranks = ", ".join(f"rank {r}: {c} clients" for r, c in sorted(counts.items()))
        log.info("glora rule %r over %d nodes: %s", self.rule_name, len(self.nodes), ranks)


def discover_nodes(grid: Grid, expected: int, timeout: float, poll: float = 1.0) -> dict[int, tuple[int, int]]:
    """Wait until ``expected`` nodes are connected, then ask each for its partition and rank.

    Returns {partition id: (node id, rank)} covering partitions 0..expected-1. A node that
    answers with an error is left out with a logged reason; ValueError when partitions are
    missing or claimed twice, or when the nodes do not connect within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ValueError(
                f"{len(ids)} of {expected} nodes connected within {timeout:.0f} s: start more SuperNodes "
                "(one per partition) or lower the run config's 'clients'"
            )
        time.sleep(poll)
    found, reasons, replied = query_nodes(grid, ids, timeout)
    missing = sorted(set(range(expected)) - set(found))
    if missing:
        # Nodes that fail alike (a num-partitions that is not the run's clients) share one
        # reason: each reason once, with the nodes that gave it, not a 35,000-character error at 200 nodes.
        by_reason: dict[str, list[int]] = {}
        for node, reason in reasons:
            by_reason.setdefault(reason, []).append(node)
        grouped = "; ".join(
            f"node {nodes[0]}: {reason}" if len(nodes) == 1 else f"nodes {few(nodes)}: {reason}"
            for reason, nodes in by_reason.items()
        )
        raise ValueError(
            f"no node answered for partitions {few(missing, 20)} of {expected} ({replied} of {len(ids)} nodes replied"
            + (f"; {grouped}" if reasons else "")
            + ")"
        )
    return {p: found[p] for p in range(expected)}


def few(items: Sequence[int], shown: int = 3) -> str:
    """The first ``shown`` of ``items``, and how many more: "[0, 1, 2 and 197 more]"."""
    more = f" and {len(items) - shown} more]" if len(items) > shown else "]"
    return "[" + ", ".join(str(i) for i in items[:shown]) + more


def query_nodes(
    grid: Grid, ids: Sequence[int], timeout: float
) -> tuple[dict[int, tuple[int, int]], list[tuple[int, str]], int]:
    """Ask the nodes ``ids`` for their partition and rank: ({partition id: (node id, rank)},
    (node id, reason) of each node that answered with an error, the number of replies).
    ValueError when two nodes declare one partition."""
    queries = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in ids
    ]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    found: dict[int, tuple[int, int]] = {}
    reasons = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reasons.append((node, reply.error.reason))
            log.warning("node %d left out: %s", node, reply.error.reason)
            continue
        m = reply.content["metrics"]
        pid, rank = int(m["partition-id"]), int(m["rank"])
        if pid in found:
            raise ValueError(
                f"nodes {found[pid][0]} and {node} both declare partition-id {pid}: give each SuperNode its own "
                "--node-config 'partition-id=I num-partitions=N'"
            )
        found[pid] = (node, rank)
    return found, reasons, len(replies)
