"""GLoRA (or another glora rule) as a Flower strategy for apps whose clients speak plain peft.

The clients are those Flower's LLM examples (FlowerTune) write: a node loads the train
message's ArrayRecord (key ``arrays``) into its peft model with ``set_peft_model_state_dict``,
trains, and replies with ``ArrayRecord(get_peft_model_state_dict(model))`` (its LoRA tensors
and any ``modules_to_save`` head) and a MetricRecord holding ``num-examples``. Nodes may
have different LoRA ranks.

:class:`GLoRAStrategy` is Flower's FedAvg with the aggregation replaced: FedAvg samples the
nodes and builds the messages, then each node's message carries the rule's readout at that
node's ranks (read from the shapes of its own last reply) and the head, the weighted mean of
the nodes' heads. The round's result (``Result.arrays`` of ``strategy.start``) is the global
update as one peft state dict: every layer's total update at its numerical rank R with
scale 1 (r = lora_alpha = R; :meth:`GLoRAStrategy.save_global` writes it with that config).

A node the server has not heard from yet receives the arrays without their LoRA tensors (the
head only) and trains from its own fresh adapter. Before the first aggregation that is the
global model (a fresh adapter, B = 0, adds nothing), so its reply counts; after it, the reply
only tells the server the node's ranks and is left out of that round's aggregate (logged).
Federated evaluation sends the same readouts, to the nodes whose ranks are known.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from peft import LoraConfig
from torch import Tensor

from glora.aggregation import ClientPlan, LayerState, Rule, average_params, get_rule
from glora.lowrank import LowRank
from glora.peft_server import save_adapter
from glora.peft_state import is_lora_key, lora_scale, split_state_dict, to_state_dict, total_config, total_factors

log = logging.getLogger("flwr.glora")  # a child of Flower's logger: shown by `flwr run --stream` and `flwr log`


def peft_client_problem(rule: Rule) -> str | None:
    """Why nodes that train and send their whole peft adapter and load what they receive
    cannot follow ``rule``, or None when they can (glora, fedit, flexlora, hetlora)."""
    if rule.pooled:
        return "it is the pooled-data reference, not a server rule"
    if any(rule.client_plan(t) != ClientPlan() for t in (1, 2)):
        return "its clients train or send only some factors, or keep factors or the head to themselves"
    # Whether a rule merges into the base weights is a property of its states: ask one.
    if rule.aggregate([LowRank(torch.ones(1, 1), torch.ones(1, 1))], [1.0]).merge() is not None:
        return "it merges the update into the base weights every round, which a peft adapter cannot carry"
    return None


def layout_of(factors: Mapping[str, LowRank], head: Mapping[str, Tensor]) -> tuple[dict, dict]:
    """What every node's reply must share: ({layer: (d_out, d_in)}, {head key: shape})."""
    return {n: f.shape for n, f in factors.items()}, {k: tuple(t.shape) for k, t in head.items()}


class GLoRAStrategy(FedAvg):
    """A glora rule over nodes that send and load plain peft state dicts (see the module doc).

    Parameters
    ----------
    lora_alpha : the nodes' peft ``lora_alpha``: a number (the same at every rank, as peft's
        default setting is) or a function of the rank (e.g. ``lambda r: 2 * r``). With
        ``use_rslora``, the nodes' rsLoRA setting. The server reads a node's update of a
        layer as ``scale * B @ A`` with peft's scale, lora_alpha / r (or / sqrt(r)).
    rule, rule_options : ``glora.get_rule(rule, **rule_options)``; a rule whose clients do
        more than train and send the whole adapter (ffa-lora, fedsa-lora, rolora) or that
        merges into the base weights (flora, florist, fedex-lora, glora restart) is refused.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : as Flower's ``FedAvg``.

    After a round, ``layers`` holds the rule's state of every layer ({layer: LayerState}),
    ``head`` the averaged head and ``node_ranks`` each node's rank per layer.
    """

    def __init__(
        self,
        lora_alpha: float | Callable[[int], float],
        use_rslora: bool = False,
        rule: str = "glora",
        rule_options: Mapping[str, Any] | None = None,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.rule = get_rule(rule, **(rule_options or {}))
        problem = peft_client_problem(self.rule)
        if problem is not None:
            raise ValueError(
                f"rule {rule!r} cannot serve plain peft clients: {problem}; use glora, fedit, flexlora or hetlora"
            )
        self.alpha = lora_alpha if callable(lora_alpha) else (lambda r: float(lora_alpha))
        self.use_rslora = use_rslora
        self.layers: dict[str, LayerState] | None = None
        self.head: dict[str, Tensor] = {}
        self.node_ranks: dict[int, dict[str, int]] = {}
        self.layout: tuple[dict, dict] | None = None  # the first usable reply's, see layout_of
        self.dtype = torch.float32
        self._fresh: set[int] = set()  # nodes of this round sent no readout although the state existed

    def scale(self, rank: int) -> float:
        return lora_scale(self.alpha(rank), rank, self.use_rslora)

    def summary(self) -> None:
        log.info("glora rule %r over plain peft nodes (%s)", self.rule.name, "rsLoRA" if self.use_rslora else "LoRA")
        super().summary()

    # -- messages out ----------------------------------------------------------------------------
    def readout(self, ranks: Mapping[str, int]) -> dict[str, Tensor]:
        """The peft state dict a node of these ranks ({layer: r}) receives: every layer's
        readout at its rank and the node's scale, and the head."""
        factors = {n: s.readout(ranks[n], self.scale(ranks[n])) for n, s in self.layers.items()}
        return to_state_dict(factors, self.head)

    def _to_node(self, msg: Message, arrays: ArrayRecord) -> Message:
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: msg.content[self.configrecord_key]})
        return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each with the node's readout, or the head only for a node of
        unknown rank."""
        self._fresh = set()
        out = []
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            if self.layers is not None and node in self.node_ranks:
                out.append(self._to_node(msg, ArrayRecord(self.readout(self.node_ranks[node]))))
                continue
            if self.layers is not None:
                self._fresh.add(node)
            out.append(self._to_node(msg, ArrayRecord({k: v for k, v in arrays.items() if not is_lora_key(k)})))
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages to the nodes of known rank, each with the node's readout."""
        if self.layers is None:
            return []
        return [
            self._to_node(msg, ArrayRecord(self.readout(self.node_ranks[msg.metadata.dst_node_id])))
            for msg in super().configure_evaluate(server_round, arrays, config, grid)
            if msg.metadata.dst_node_id in self.node_ranks
        ]

    # -- replies in ------------------------------------------------------------------------------
    def _read_reply(self, msg: Message) -> tuple[dict[str, LowRank], dict[str, Tensor], float]:
        """A reply's (factors, head, weight); ValueError with the reason it cannot be used."""
        content = msg.content
        if self.arrayrecord_key not in content.array_records:
            raise ValueError(f"no ArrayRecord {self.arrayrecord_key!r} in the reply")
        metrics = next(iter(content.metric_records.values()), {})  # FedAvg reads the first MetricRecord
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"its MetricRecord's {self.weighted_by_key!r} is {weight!r}, not a positive number")
        pairs, head = split_state_dict(content[self.arrayrecord_key].to_torch_state_dict())
        if not pairs:
            raise ValueError("its state dict holds no LoRA tensors (<layer>.lora_A.weight, .lora_B.weight)")
        factors = {n: LowRank(B, A, self.scale(B.shape[1])) for n, (B, A) in pairs.items()}
        if self.layout is not None:
            (shapes, head_shapes), (known, known_head) = layout_of(factors, head), self.layout
            if shapes != known:
                layer = next(n for n in sorted(set(shapes) | set(known)) if shapes.get(n) != known.get(n))
                raise ValueError(
                    f"layer {layer!r} has shape {shapes.get(layer)}, the federation's is {known.get(layer)}"
                )
            if head_shapes != known_head:
                raise ValueError(f"head tensors {head_shapes} differ from the federation's {known_head}")
        tensors = {**{f"{n}.lora_{x}": getattr(f, x) for n, f in factors.items() for x in "AB"}, **head}
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
        return factors, head, float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule's aggregate of the usable replies, as the global peft state dict (None,
        None when no reply is usable: the state stays as it was)."""
        # FedAvg's consistency check is all or nothing: one bad reply would drop the round.
        # Each reply is checked here instead, and a bad one is left out with its reason.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        used, updates, heads, weights = [], [], [], []
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                factors, head, weight = self._read_reply(msg)
            except ValueError as e:
                log.warning("round %d: left out node %d: %s", server_round, node, e)
                continue
            self.layout = self.layout or layout_of(factors, head)
            self.dtype = next(iter(factors.values())).dtype
            self.node_ranks[node] = {n: f.rank for n, f in factors.items()}
            if node in self._fresh:
                log.info(
                    "round %d: node %d (ranks %s) trained from a fresh adapter, not the global model: left out "
                    "of this round; it receives its readout from now on",
                    server_round,
                    node,
                    sorted(set(self.node_ranks[node].values())),
                )
                continue
            used.append(msg.content)
            updates.append(factors)
            heads.append(head)
            weights.append(weight)
        if not used:
            log.warning("round %d: no usable reply; the server state stays as it was", server_round)
            return None, None
        by_layer = {n: [u[n] for u in updates] for n in self.layout[0]}
        self.layers = self.rule.aggregate_layers(by_layer, weights, previous=self.layers)
        self.head = average_params(heads, weights)
        return ArrayRecord(self.global_state_dict()), self.train_metrics_aggr_fn(used, self.weighted_by_key)

    # -- the result ------------------------------------------------------------------------------
    def global_state_dict(self) -> dict[str, Tensor]:
        """The global update as a peft state dict (see the module doc) with the head."""
        if self.layers is None:
            raise ValueError("no round has aggregated a reply yet: there is no global update")
        factors = total_factors({n: s.total() for n, s in self.layers.items()}, self.dtype)
        return to_state_dict(factors, self.head)

    def save_global(self, folder: Path, lora_config: LoraConfig) -> None:
        """Save the global update as a peft adapter folder. ``lora_config``: the nodes'
        config (its base model, task type, target modules and modules_to_save are kept; r
        and lora_alpha become the global adapter's own)."""
        state_dict = self.global_state_dict()
        rank = next(t.shape[0] for k, t in state_dict.items() if k.endswith(".lora_A.weight"))
        save_adapter(folder, state_dict, total_config(lora_config, rank))
