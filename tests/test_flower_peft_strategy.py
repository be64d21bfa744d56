"""GLoRAStrategy, the server for Flower apps whose clients send and load plain peft state
dicts: its message flow on mock replies, and the example app of examples/flower-peft (flwr,
peft and transformers clients of ranks 2, 4 and 8) for two rounds in Flower's simulation
engine."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower strategy needs the optional extra: pip install -e '.[flower]'")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from glora import LowRank, get_rule
from glora.flower import GLoRAStrategy
from glora.lowrank import lora_init_A
from tests.conftest import rel_err

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-peft"
SHAPES = {"base_model.model.enc.0.query": (12, 10), "base_model.model.enc.0.value": (8, 10)}
HEAD = "base_model.model.classifier.weight"
ALPHA = 16


class Nodes:
    """What FedAvg's sampling asks of a grid: the connected node ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def state_dict(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A peft state dict of the mock model: fresh LoRA factors of ``rank`` and a head."""
    g = torch.Generator().manual_seed(seed)
    out = {HEAD: torch.randn(2, 10, generator=g)}
    for layer, (d_out, d_in) in SHAPES.items():
        out[f"{layer}.lora_A.weight"] = lora_init_A(rank, d_in, g)
        out[f"{layer}.lora_B.weight"] = torch.zeros(d_out, rank)
    return out


def reply(msg: Message, rank: int, examples: int, seed: int, fault: str | None = None) -> Message:
    """A node's answer: what it received (its fresh adapter for tensors not sent) moved by
    seeded noise, as training would, with its example count; ``fault``: "nan" or "shape"."""
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids do when they push
    sent = msg.content["arrays"].to_torch_state_dict()
    g = torch.Generator().manual_seed(seed)
    trained = {k: sent.get(k, v) + 0.1 * torch.randn(v.shape, generator=g) for k, v in state_dict(rank, seed).items()}
    first = next(iter(SHAPES))
    if fault == "nan":
        trained[f"{first}.lora_B.weight"][0, 0] = float("nan")
    if fault == "shape":
        trained[f"{first}.lora_A.weight"] = trained[f"{first}.lora_A.weight"][:, :-1]
    metrics = MetricRecord({"train-loss": 1.0 / examples, "num-examples": examples})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


def read(msg: Message) -> tuple[dict[str, LowRank], float]:
    """A reply's factors (scale 16 / r, the nodes' peft scale) and example count."""
    sd = msg.content["arrays"].to_torch_state_dict()
    factors = {}
    for layer in SHAPES:
        B, A = sd[f"{layer}.lora_B.weight"], sd[f"{layer}.lora_A.weight"]
        factors[layer] = LowRank(B, A, ALPHA / B.shape[1])
    return factors, float(msg.content["metrics"]["num-examples"])


def by_node(messages) -> dict[int, dict[str, torch.Tensor]]:
    return {m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict() for m in messages}


def test_each_node_gets_the_readout_at_its_rank_and_new_or_bad_replies_are_left_out(task_identity, caplog):
    ranks = {11: 2, 22: 4, 33: 8, 44: 4, 55: 2}
    examples = {11: 30, 22: 10, 33: 60, 44: 20, 55: 5}
    strategy = GLoRAStrategy(lora_alpha=ALPHA, min_train_nodes=3, min_available_nodes=3)
    rule = get_rule("glora")

    # Round 1: no rank is known yet; every node gets the head of the initial arrays only.
    sent = strategy.configure_train(1, ArrayRecord(state_dict(8, 0)), ConfigRecord(), Nodes([11, 22, 33]))
    assert all(list(sd) == [HEAD] for sd in by_node(sent).values())
    replies = [reply(m, ranks[m.metadata.dst_node_id], examples[m.metadata.dst_node_id], 1) for m in sent]
    arrays, metrics = strategy.aggregate_train(1, replies)
    read_1 = [read(r) for r in replies]
    after_1 = rule.aggregate_layers({n: [f[n] for f, _ in read_1] for n in SHAPES}, [w for _, w in read_1])
    assert metrics["train-loss"] == pytest.approx(3 / 100)  # the example-weighted mean of 1 / examples
    glob = arrays.to_torch_state_dict()  # the global update: scale 1 at its numerical rank
    for n in SHAPES:
        assert rel_err(strategy.layers[n].delta(), after_1[n].delta()) < 1e-12
        assert rel_err(glob[f"{n}.lora_B.weight"] @ glob[f"{n}.lora_A.weight"], after_1[n].delta()) < 1e-6

    # Round 2: the known nodes get their readouts; nodes 44 and 55 are new and get the head
    # only; node 22 sends NaN, node 55 a layer of another shape. Only 11 and 33 are aggregated.
    sent = strategy.configure_train(2, arrays, ConfigRecord(), Nodes([11, 22, 33, 44, 55]))
    got = by_node(sent)
    assert list(got[44]) == [HEAD] and torch.equal(got[44][HEAD], strategy.head[HEAD])
    for node in (11, 22, 33):
        r = ranks[node]
        for n in SHAPES:
            want = after_1[n].readout(r, ALPHA / r)
            assert got[node][f"{n}.lora_A.weight"].shape == (r, SHAPES[n][1])
            assert torch.equal(got[node][f"{n}.lora_B.weight"], want.B)
            assert torch.equal(got[node][f"{n}.lora_A.weight"], want.A)
    nodes = [m.metadata.dst_node_id for m in sent]
    faults = {22: "nan", 55: "shape"}
    replies = [reply(m, ranks[i], examples[i], 2, faults.get(i)) for m, i in zip(sent, nodes, strict=True)]
    with caplog.at_level(logging.INFO, logger="flwr.glora"):
        strategy.aggregate_train(2, replies)
    assert re.search(r"round 2: left out node 22: .*lora_B contains NaN or Inf", caplog.text)
    assert "left out node 55: layer 'base_model.model.enc.0.query' has shape (12, 9), the federation's is (12, 10)" in (
        caplog.text
    )
    assert "round 2: node 44 (ranks [4]) trained from a fresh adapter, not the global model: left out" in caplog.text
    used = [read(r) for r in replies if r.metadata.src_node_id in (11, 33)]
    after_2 = rule.aggregate_layers({n: [f[n] for f, _ in used] for n in SHAPES}, [w for _, w in used], after_1)
    for n in SHAPES:
        assert rel_err(strategy.layers[n].delta(), after_2[n].delta()) < 1e-12

    # Node 44's rank is known now: evaluation (and its next round) carries its readout.
    got = by_node(strategy.configure_evaluate(2, arrays, ConfigRecord(), Nodes([11, 22, 33, 44, 55])))
    assert sorted(got) == [11, 22, 33, 44]
    for node, sd in got.items():
        r = ranks[node]
        for n in SHAPES:
            want = after_2[n].readout(r, ALPHA / r)
            assert torch.equal(sd[f"{n}.lora_B.weight"], want.B)


@pytest.mark.parametrize("rule", ["flora", "fedex-lora", "ffa-lora", "fedsa-lora", "centralized"])
def test_rules_plain_peft_clients_cannot_follow_are_refused(rule):
    with pytest.raises(ValueError, match=rf"rule '{rule}' cannot serve plain peft clients: .*; use glora"):
        GLoRAStrategy(lora_alpha=ALPHA, rule=rule)


def test_the_readme_shows_the_example_servers_code():
    text = (EXAMPLE / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "GLoRAStrategy(" in b]
    assert snippet in (EXAMPLE / "server_app.py").read_text()  # the code the simulation below runs


@pytest.fixture
def example(monkeypatch):
    """The example app's folder on sys.path (Ray's workers get the driver's sys.path), and
    its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    for module in ("simulate", "server_app", "client_app"):
        sys.modules.pop(module, None)


def lora_layers(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs Ray")
def test_the_example_app_runs_two_rounds_in_flowers_simulation_engine(tmp_path, monkeypatch, example):
    # The example's own entry point (simulate.main), with its ServerApp's strategy recorded.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))  # Flower's state here, not in ~/.flwr
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    server_app = importlib.import_module("server_app")
    rounds = {}

    class Recording(GLoRAStrategy):
        def configure_train(self, server_round, arrays, config, grid):
            sent = super().configure_train(server_round, arrays, config, grid)
            rounds[server_round] = {"sent": by_node(sent)}
            return sent

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            rounds[server_round]["replies"] = [
                (
                    m.metadata.src_node_id,
                    m.content["arrays"].to_torch_state_dict(),
                    m.content["metrics"]["num-examples"],
                )
                for m in replies
            ]
            out = super().aggregate_train(server_round, replies)
            rounds[server_round]["after"] = self.layers
            return out

    monkeypatch.setattr(server_app, "GLoRAStrategy", Recording)
    importlib.import_module("simulate").main()

    assert sorted(rounds) == [1, 2]
    first = rounds[1]["replies"]
    layers = lora_layers(first[0][1])
    assert len(layers) == 4  # query and value of 2 BERT layers
    ranks = {node: sd[f"{layers[0]}.lora_A.weight"].shape[0] for node, sd, _ in first}
    assert sorted(ranks.values()) == [2, 4, 8]
    # Round 2: every node received round 1's state read out at its own rank, and the new state
    # is the rule's aggregate of their replies from there.
    for node, sd in rounds[2]["sent"].items():
        r = ranks[node]
        for n in layers:
            want = rounds[1]["after"][n].readout(r, 16 / r)
            assert torch.equal(sd[f"{n}.lora_B.weight"], want.B) and torch.equal(sd[f"{n}.lora_A.weight"], want.A)
    replies = rounds[2]["replies"]
    updates = {
        n: [LowRank(sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"], 16 / ranks[node]) for node, sd, _ in replies]
        for n in layers
    }
    expected = get_rule("glora").aggregate_layers(updates, [w for _, _, w in replies], rounds[1]["after"])
    for n in layers:
        assert rel_err(rounds[2]["after"][n].delta(), expected[n].delta()) < 1e-12

    # The saved global adapter loads in peft and holds the final global update.
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = sys.modules["client_app"].peft_model(2).unload()
    model = PeftModel.from_pretrained(base, tmp_path / "global-adapter")
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            got = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            assert rel_err(got, expected[name].delta()) < 1e-6, name
