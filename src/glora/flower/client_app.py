"""The ClientApp: one node of the federation, training its partition at its rank.

A node declares itself in its node config (``flower-supernode --node-config``, or Flower's
simulation engine, which sets the first two): ``partition-id`` (which client it is),
``num-partitions`` (must equal the run config's ``clients``) and, optionally, ``rank``
(default: the run config's rank list, assigned by partition id). Every node reads the same
data and computes the same seeded partition, then trains on its own part with the
in-process simulation's client step (see :mod:`glora.flower.training`).

A node may also declare ``worker`` (the socket of a ``glora node-worker`` on that machine):
its train messages then go to that long-lived process, which keeps the backbone loaded,
instead of loading it in this message's process (see :mod:`glora.flower.node_worker`).

This module imports only flwr at load time: in deployment every message runs in a fresh
process, and a forwarded train message needs neither torch nor the model code (a query
reads the run config, which imports the rules and so torch, once per node and run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from glora.federation.config import RunConfig

app = ClientApp()


@dataclass(frozen=True)
class Node:
    """This node's run config, partition and declared rank."""

    cfg: RunConfig
    partition: int
    rank: int


def node_identity(run_config: dict[str, Any], node_config: dict[str, Any]) -> Node:
    """The node's partition and rank from its node config (ValueError saying what to set)."""
    from glora.flower.config import from_run_config

    cfg, _ = from_run_config(run_config)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            f"node config {dict(node_config)} lacks partition-id / num-partitions: start the SuperNode with "
            "--node-config 'partition-id=I num-partitions=N' (and optionally rank=R)"
        )
    pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if parts != cfg.clients:
        raise ValueError(
            f"node config num-partitions={parts} but the run config has clients={cfg.clients}: "
            "they must agree (every node computes the same partition of the data)"
        )
    if not 0 <= pid < parts:
        raise ValueError(f"node config partition-id={pid} is outside 0..{parts - 1}")
    rank = int(node_config["rank"]) if "rank" in node_config else cfg.client_ranks()[pid]
    if rank < 1:
        raise ValueError(f"node config rank={rank}: a LoRA rank must be >= 1")
    return Node(cfg, pid, rank)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition and rank."""
    node = node_identity(context.run_config, context.node_config)
    return Message(
        RecordDict({"metrics": MetricRecord({"partition-id": node.partition, "rank": node.rank})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train this node's partition from the server's readout (here, or in the
    node's worker); reply with the trained factors, head, example count and mean loss."""
    worker = context.node_config.get("worker")
    if worker:
        from glora.flower.node_worker import forward, pack, unpack

        request = (dict(context.run_config), dict(context.node_config), pack(msg.content), pack(context.state))
        content, state = forward(str(worker), request, float(context.run_config.get("round-timeout", 900.0)))
        for k in list(context.state.keys()):
            del context.state[k]
        for k, v in unpack(state).items():
            context.state[k] = v
        return Message(unpack(content), reply_to=msg)
    node = node_identity(context.run_config, context.node_config)
    from glora.flower.training import train_reply

    return Message(train_reply(msg.content, context.state, node.cfg, node.partition), reply_to=msg)
