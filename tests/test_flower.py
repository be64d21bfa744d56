"""The Flower app: the strategy's aggregation on mock replies, the run-config mapping, and
2-round runs on Flower's deployment engine (a SuperLink and 2 SuperNodes on 127.0.0.1) and
simulation engine (Ray), each checked against the in-process simulation."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower app needs the optional extra: pip install -e '.[flower]'")

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.config import parse_config_args
from flwr.serverapp import Grid

from glora.aggregation import RULES, average_params, get_rule
from glora.aggregation.base import FACTORS
from glora.federation.config import RunConfig
from glora.federation.results import RunStore
from glora.federation.simulation import Federation
from glora.flower import client_app
from glora.flower.client_app import node_identity
from glora.flower.config import FlowerOptions, from_run_config, run_config_overrides, to_run_config
from glora.flower.loopback import Processes, free_port, start_superlink, start_supernode, write_connection
from glora.flower.records import decode_factors, decode_head, encode
from glora.flower.server_app import run_server
from glora.flower.strategy import NodeClient, RuleStrategy, discover_nodes
from glora.flower.training import OWN
from glora.lowrank import LowRank, lora_init_A
from glora.models.lora import LoraSettings

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"layer.0.query": (12, 10), "layer.0.value": (8, 10)}
SETTINGS = LoraSettings()


def init_adapters(ranks):
    out = {}
    for r in sorted(set(ranks)):
        g = torch.Generator().manual_seed(r)
        out[r] = {
            n: LowRank(torch.zeros(d, r), lora_init_A(r, k, g), SETTINGS.scale(r)) for n, (d, k) in SHAPES.items()
        }
    return out


def initial_head():
    g = torch.Generator().manual_seed(5)
    return {"classifier.weight": torch.randn(2, 10, generator=g), "classifier.bias": torch.randn(2, generator=g)}


class FakeGrid(Grid):
    """Nodes answering in-process: each node "trains" by adding seeded noise to what it
    received (a real node's replies, without the backbone), or misbehaves as told.

    ``faults[(round, node_id)]``: "nan", "shape", "thaw" (changes a frozen factor), "x1000"
    (sends 1,000 times its update), "no-count", "error" or "silent".
    """

    def __init__(self, node_ids, examples, faults=None, rule="glora"):
        self.node_ids = list(node_ids)
        self.rule = get_rule(rule)
        self.examples = examples
        self.faults = faults or {}
        self.received: dict[tuple[int, int], dict[str, LowRank]] = {}
        self.trained: dict[tuple[int, int], tuple[dict[str, LowRank], dict[str, torch.Tensor]]] = {}

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return self.node_ids

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's own grids do
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.push_messages(messages)
        return [r for m in messages if (r := self.answer(m)) is not None]

    def answer(self, msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "query":
            pid = self.node_ids.index(node)
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "rank": 2})}), reply_to=msg)
        t = int(msg.content["config"]["server-round"])
        fault = self.faults.get((t, node))
        if fault == "silent":
            return None
        if fault == "error":
            return Message(Error(code=2, reason="<class 'RuntimeError'>:<'out of memory'>"), reply_to=msg)
        arrays = msg.content["arrays"]
        factors = decode_factors(arrays, SETTINGS.scale(2))  # 2.0 at every rank: lora_alpha = 2r
        self.received[(t, node)] = factors
        g = torch.Generator().manual_seed(1000 * t + node)
        train = self.rule.client_plan(t).train  # a factor the rule freezes comes back as received

        def step(x, factor):
            return (x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype) if factor in train else x).float()

        trained = {n: LowRank(step(f.B, "B"), step(f.A, "A"), f.scale) for n, f in factors.items()}
        head = {n: (h + 0.1 * torch.randn(h.shape, generator=g)).float() for n, h in decode_head(arrays).items()}
        self.trained[(t, node)] = (trained, head)
        sent = dict(trained)
        if fault == "nan":
            B = sent["layer.0.value"].B.clone()
            B[0, 0] = float("nan")
            sent["layer.0.value"] = LowRank(B, sent["layer.0.value"].A, 2.0)
        if fault == "thaw":
            f = sent["layer.0.query"]
            sent["layer.0.query"] = LowRank(f.B, f.A + 0.01, f.scale)
        if fault == "shape":
            f = sent["layer.0.query"]
            sent["layer.0.query"] = LowRank(f.B[:, :1], f.A[:1], 2.0)
        if fault == "x1000":  # finite garbage: every layer's update 1,000 times what it trained
            sent = {n: LowRank(1000 * f.B, f.A, f.scale) for n, f in sent.items()}
        metrics = (
            {"train-loss": 0.5} if fault == "no-count" else {"num-examples": self.examples[node], "train-loss": 0.5}
        )
        content = RecordDict({"arrays": encode(sent, head), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)


def make_strategy(rule, ranks, **kw):
    nodes = [NodeClient(node_id=100 + i, client=i, rank=r) for i, r in enumerate(ranks)]
    return RuleStrategy(rule, nodes, init_adapters(ranks), initial_head(), SETTINGS.scale, **kw)


def expected_rounds(rule_name, strategy, grid, rounds, good):
    """What the rule makes of the good nodes' updates, round by round (the reference)."""
    rule = get_rule(rule_name)
    layers, head = None, initial_head()
    for t in range(1, rounds + 1):
        nodes = [n for n in strategy.nodes if (t, n.node_id) in good]
        updates = {name: [grid.trained[(t, n.node_id)][0][name] for n in nodes] for name in SHAPES}
        weights = [float(grid.examples[n.node_id]) for n in nodes]
        layers = rule.aggregate_layers(updates, weights, previous=layers)
        if rule.client_plan(t).share_head:
            head = average_params([grid.trained[(t, n.node_id)][1] for n in nodes], weights)
    return layers, head


@pytest.mark.parametrize("rule", sorted(RULES))
def test_strategy_aggregates_like_the_rule_and_leaves_out_bad_replies(task_identity, rule, caplog):
    # Unequal ranks wherever the rule accepts them; a NaN reply in round 1, a reply without
    # an example count in round 2: both must be left out, with the others aggregated.
    cls = RULES[rule]
    ranks = [2, 4, 3, 4] if cls.accepts_unequal_ranks else [4, 4, 4, 4]
    if cls.pooled:
        ranks = [4]  # the pooled reference is one client
    strategy = make_strategy(rule, ranks)
    ids = [n.node_id for n in strategy.nodes]
    faults = {} if cls.pooled else {(1, ids[1]): "nan", (2, ids[3]): "no-count"}
    grid = FakeGrid(ids, {n: 10 * (k + 1) + 7 for k, n in enumerate(ids)}, faults, rule)
    with caplog.at_level(logging.WARNING, logger="flwr.glora"):
        strategy.start(grid, ArrayRecord(initial_head()), num_rounds=2)
    good = {(t, n) for t in (1, 2) for n in ids if (t, n) not in faults}
    layers, head = expected_rounds(rule, strategy, grid, 2, good)
    for name in SHAPES:
        assert torch.equal(strategy.state.layers[name].delta(), layers[name].delta())
    for name, h in head.items():
        assert torch.equal(strategy.state.head[name], h)
    if not cls.pooled:
        assert "left out client 1 (node 101): layer layer.0.value: factors contain NaN or Inf" in caplog.text
        assert "left out client 3 (node 103): no example count" in caplog.text
    # Round 2 started from the readout of round 1's state, at each node's own rank.
    after_1 = get_rule(rule).aggregate_layers(
        {n: [grid.trained[(1, i)][0][n] for i in ids if (1, i) in good] for n in SHAPES},
        [float(grid.examples[i]) for i in ids if (1, i) in good],
    )
    for node in strategy.nodes:
        for name, f in grid.received[(2, node.node_id)].items():
            want = after_1[name].readout(node.rank, SETTINGS.scale(node.rank))
            assert f.rank == node.rank and torch.equal(f.B, want.B) and torch.equal(f.A, want.A)


def test_wrong_shape_and_error_replies_are_left_out_and_a_round_without_good_replies_stops_the_run(
    task_identity, caplog
):
    strategy = make_strategy("glora", [2, 4])
    ids = [n.node_id for n in strategy.nodes]
    faults = {(1, ids[0]): "shape", (2, ids[0]): "error", (2, ids[1]): "silent"}
    grid = FakeGrid(ids, {ids[0]: 30, ids[1]: 50}, faults)
    states = []
    with caplog.at_level(logging.WARNING, logger="flwr.glora"), pytest.raises(ValueError) as stopped:
        strategy.start(
            grid,
            ArrayRecord(initial_head()),
            num_rounds=2,
            evaluate_fn=lambda t, _: states.append((strategy.last_record, dict(strategy.state.layers or {}))),
        )
    assert "factors of shapes B (12, 1), A (1, 10); the rank-2 adapter sent has B (12, 2), A (2, 10)" in caplog.text
    message = str(stopped.value)
    assert message.startswith("round 2: 2 of 2 clients failed") and "last checkpoint is kept" in message
    assert "the node reported an error (code 2): <class 'RuntimeError'>:<'out of memory'>" in message
    assert "client 1: no reply within the round's timeout" in message
    record_1, layers_1 = states[1]
    assert record_1["clients"] == [1] and "0" in record_1["left_out"]  # 1 of 2 left out: the round goes on
    assert all(strategy.state.layers[n] is layers_1[n] for n in SHAPES)  # the state of round 1, untouched
    only = get_rule("glora").aggregate_layers({n: [grid.trained[(1, ids[1])][0][n]] for n in SHAPES}, [1.0])
    assert all(torch.equal(layers_1[n].delta(), only[n].delta()) for n in SHAPES)


def test_discovery_maps_partitions_to_nodes_and_refuses_duplicates(task_identity):
    grid = FakeGrid([7, 3, 9], {})
    assert discover_nodes(grid, 3, timeout=5) == {0: (7, 2), 1: (3, 2), 2: (9, 2)}
    with pytest.raises(ValueError, match=r"2 of 3 nodes connected within 0 s"):
        discover_nodes(FakeGrid([7, 3], {}), 3, timeout=0, poll=0.01)

    class Twice(FakeGrid):
        def answer(self, msg):
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": 0, "rank": 4})}), reply_to=msg)

    with pytest.raises(ValueError, match="nodes 3 and 7 both declare partition-id 0"):
        discover_nodes(Twice([7, 3], {}), 2, timeout=5)


def test_strategy_refuses_bad_setup():
    with pytest.raises(ValueError, match="unknown rule 'fedavg'"):
        make_strategy("fedavg", [2, 4])
    nodes = [NodeClient(1, 0, 2), NodeClient(2, 2, 4)]
    with pytest.raises(ValueError, match=r"client indices 0..1, got \[0, 2\]"):
        RuleStrategy("glora", nodes, init_adapters([2, 4]), initial_head(), SETTINGS.scale)
    with pytest.raises(ValueError, match="rank 8 but no initial adapter"):
        RuleStrategy("glora", [NodeClient(1, 0, 8)], init_adapters([2]), initial_head(), SETTINGS.scale)


def test_a_node_that_trains_a_frozen_factor_is_left_out(task_identity, caplog):
    # FFA-LoRA freezes A: a node that sends back a changed A breaks the rule's exactness.
    strategy = make_strategy("ffa-lora", [4, 4, 4])
    ids = [n.node_id for n in strategy.nodes]
    grid = FakeGrid(ids, {n: 20 for n in ids}, {(1, ids[2]): "thaw"}, "ffa-lora")
    with caplog.at_level(logging.WARNING, logger="flwr.glora"):
        strategy.start(grid, ArrayRecord(initial_head()), num_rounds=1)
    assert "left out client 2 (node 102): layer layer.0.query: the rule freezes A this round" in caplog.text
    assert strategy.last_record["clients"] == [0, 1]


def test_node_identity_from_node_config():
    run_config = to_run_config(RunConfig(clients=3, ranks="2,4"))
    assert node_identity(run_config, {"partition-id": 2, "num-partitions": 3}).rank == 2  # the list, in turn
    assert node_identity(run_config, {"partition-id": 1, "num-partitions": 3, "rank": 16}).rank == 16
    with pytest.raises(ValueError, match="lacks partition-id / num-partitions: start the SuperNode with"):
        node_identity(run_config, {})
    with pytest.raises(ValueError, match="num-partitions=2 but the run config has clients=3"):
        node_identity(run_config, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ValueError, match=r"partition-id=3 is outside 0..2"):
        node_identity(run_config, {"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ValueError, match="rank=0: a LoRA rank must be >= 1"):
        node_identity(run_config, {"partition-id": 0, "num-partitions": 3, "rank": 0})


def test_run_config_round_trip_and_pyproject_lists_every_key():
    cfg = RunConfig(
        rule="glora",
        rule_options={"rank": 6, "readout_gauge": "a-normal"},
        alpha=None,
        ranks="2,4",
        local_epochs=0.5,
        target_modules=("query", "key", "value"),
        max_eval_examples=None,
        data_dir="/data",
    )
    options = FlowerOptions(out="/tmp/run", round_timeout=60.0)
    assert from_run_config(to_run_config(cfg, options)) == (cfg, options)
    # The string for `flwr run --run-config`, parsed by flwr itself, reads back the same way.
    assert from_run_config(parse_config_args([run_config_overrides(to_run_config(cfg, options))])) == (cfg, options)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(to_run_config(cfg))  # flwr rejects overrides of undeclared keys
    from_run_config(declared)  # and the declared defaults are valid
    with pytest.raises(ValueError, match=r"unknown run config keys \['num-server-rounds'\]"):
        from_run_config({"num-server-rounds": 3})
    with pytest.raises(ValueError, match=r"run config: option local-steps 2\.5: give an integer"):
        from_run_config({"local-steps": 2.5})
    with pytest.raises(ValueError, match="run config key 'rule-options'"):
        from_run_config({"rule-options": "rank ="})


# -- the two engines, end to end on the real backbone ------------------------------------------

# Small but real: MiniLM, 200 SST-2 training examples in 2 Dirichlet partitions, 2 rounds of 3
# steps, unequal ranks 2 and 4, one thread (so both runs use the same reduction order).
REFERENCE = RunConfig(
    task="sst2",
    rule="glora",
    clients=2,
    alpha=0.5,
    min_client_examples=10,
    ranks="2,4",
    rounds=2,
    local_steps=3,
    batch_size=16,
    eval_every=2,
    max_train_examples=200,
    max_eval_examples=32,
    threads=1,
)
# Both runs execute the same float32 kernels on the same batches in the same order, so the
# global updates should agree bit for bit (they did: difference 0.0). The tolerance admits
# only what a different reduction order could change: a few float32 ulps (~1e-7 relative)
# per operation, compounded over 2 rounds of 3 AdamW steps and the server's SVDs.
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process simulation of REFERENCE: its run folder."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    Federation(REFERENCE, folder, progress=False).run()
    return folder


def run_and_check(
    procs: Processes, connection: str, overrides: dict, extra: list[str], timeout: float, meanwhile=None
) -> None:
    """`flwr run` the app from the repository (calling ``meanwhile()`` while it runs), then
    check that the run finished completed: `flwr run` exits 0 even when the run fails."""
    args = ["flwr", "run", str(ROOT), connection, "--stream", "-c", run_config_overrides(overrides), *extra]
    run = procs.start("flwr-run", args, "cli")
    if meanwhile is not None:
        meanwhile()
    run.wait(timeout=timeout)
    out = (procs.folder / "flwr-run.log").read_text()
    started = [line for line in out.splitlines() if "Successfully started run" in line]
    assert started, f"flwr run did not start a run:\n{out[-3000:]}"
    run_id = started[0].split()[-1]
    listing = json.loads(procs.flwr("ls", connection, "--run-id", run_id, "--format", "json", timeout=60))
    status = listing["runs"][0]["status"]
    assert status == "finished:completed", f"run {run_id} ended {status}:\n{out[-3000:]}"


def assert_same_run(flower: Path, reference: Path) -> float:
    """The Flower run folder holds the in-process run's files and global update (within RTOL);
    returns the largest relative difference of a layer's update."""
    assert json.loads((flower / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    for name in ("meta.json", "summary.json", "checkpoint.pt", "adapter/adapter_config.json"):
        assert (flower / name).exists(), name
    a = torch.load(flower / "checkpoint.pt", weights_only=False)["state"]
    b = torch.load(reference / "checkpoint.pt", weights_only=False)["state"]
    rounds = json.loads((reference / "config.json").read_text())["rounds"]
    assert set(a.layers) == set(b.layers) and a.round == b.round == rounds
    worst = max(
        float((a.layers[n].delta() - b.layers[n].delta()).norm() / b.layers[n].delta().norm()) for n in a.layers
    )
    assert worst <= RTOL, f"global update differs from the in-process run by {worst:.3e} (relative) > {RTOL}"
    for k in b.head:
        assert torch.allclose(a.head[k], b.head[k], rtol=RTOL, atol=1e-7)
    rows_a = [json.loads(x) for x in (flower / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    timing = {"round_seconds", "server_seconds", "peak_rss_mb"}
    assert [sorted(set(r) - timing) for r in rows_a] == [sorted(set(r) - timing) for r in rows_b]
    # Traffic is counted from what each driver carries: a Flower reply holds both factors and
    # the head, a message down the whole readout and the dense base offsets; the in-process
    # driver counts what the rule's plan exchanges. They agree where the plan sends everything.
    config = json.loads((reference / "config.json").read_text())
    plan = get_rule(config["rule"], **config["rule_options"]).client_plan(1)
    sends_everything = plan.send == FACTORS and plan.share_head and not plan.personal
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["clients"] == rb["clients"]
        assert ra["bytes_up"] == rb["bytes_up"] if sends_everything else ra["bytes_up"] > rb["bytes_up"]
        assert ra["bytes_down"] >= rb["bytes_down"]
        assert math.isclose(ra["train_loss"], rb["train_loss"], rel_tol=RTOL)
    print(f"largest relative difference of a layer's global update: {worst:.3e} (tolerance {RTOL})")
    return worst


class LoopbackGrid(FakeGrid):
    """The real ClientApp behind a grid without a network: each message goes to
    ``client_app.app`` with that node's Context (its node config and persistent state), an
    exception becomes an error reply as Flower makes it. Everything but the transport runs."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]):
        super().__init__(list(node_configs), {})
        self.run_config, self.node_configs = run_config, node_configs
        self.states = {n: RecordDict() for n in node_configs}

    def answer(self, msg):
        n = msg.metadata.dst_node_id
        context = Context(1, n, self.node_configs[n], self.states[n], self.run_config)
        try:
            return client_app.app(msg, context)
        except Exception as e:
            return Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=msg)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["flora", "fedsa-lora", "hetlora"])
def test_the_app_runs_rules_that_merge_or_keep_personal_factors_like_the_in_process_run(tmp_path, task_identity, rule):
    # FLoRA merges into the base weights (the nodes get the offsets each round); FedSA-LoRA
    # keeps B and the head on the node (in context.state) and reports the personal models;
    # HetLoRA with self-pruning: a node that prunes uploads below its rank and keeps that rank.
    cfg = REFERENCE.replace(rule=rule, ranks="4" if rule == "fedsa-lora" else "2,4", local_steps=2)
    if rule == "hetlora":
        cfg = cfg.replace(rounds=3, eval_every=3, rule_options={"prune_gamma": 1.0})
    Federation(cfg, tmp_path / "reference", progress=False).run()
    if rule == "hetlora":  # the reference did prune (rank 4 -> 3 or 2 -> 1), so the app must too
        personal = RunStore(tmp_path / "reference").load_checkpoint()["state"].personal
        assert any(next(iter(s.factors.values())).rank < s.rank for s in personal.values())
    run_config = to_run_config(cfg, FlowerOptions(str(tmp_path / "flower")))
    grid = LoopbackGrid(
        run_config, {11: {"partition-id": 0, "num-partitions": 2}, 7: {"partition-id": 1, "num-partitions": 2}}
    )
    summary = run_server(grid, run_config, run_id=1)
    assert_same_run(tmp_path / "flower", tmp_path / "reference")
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["final"] == reference["final"] and summary["final_personal"] == reference["final_personal"]
    if rule == "fedsa-lora":
        assert all(OWN in state for state in grid.states.values())


@pytest.mark.slow
def test_a_flower_run_that_died_after_a_round_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, reference, task_identity
):
    run_config = to_run_config(REFERENCE, FlowerOptions(str(tmp_path / "flower")))
    nodes = {11: {"partition-id": 0, "num-partitions": 2}, 7: {"partition-id": 1, "num-partitions": 2}}
    real = Federation.end_round

    def die_after_round_1(self, st, t, record, t_round):
        real(self, st, t, record, t_round)  # round 1's metrics and checkpoint are written
        if t == 1:
            raise RuntimeError("the SuperLink died")

    monkeypatch.setattr(Federation, "end_round", die_after_round_1)
    with pytest.raises(RuntimeError, match="the SuperLink died"):
        run_server(LoopbackGrid(run_config, nodes), run_config, run_id=1)
    monkeypatch.setattr(Federation, "end_round", real)
    with pytest.raises(ValueError, match="already holds a run; continue it with -c resume=true"):
        run_server(LoopbackGrid(run_config, nodes), run_config, run_id=2)
    resumed = {**run_config, "resume": True}
    summary = run_server(LoopbackGrid(resumed, nodes), resumed, run_id=3)
    assert_same_run(tmp_path / "flower", reference)
    assert summary["final"] == json.loads((reference / "summary.json").read_text())["final"]
    meta = json.loads((tmp_path / "flower" / "meta.json").read_text())
    assert [r["after_round"] for r in meta["resumes"]] == [1]


@pytest.mark.slow
def test_deployment_engine_matches_the_in_process_run(tmp_path, request):
    # A SuperLink and 2 SuperNodes on loopback; node 1 declares its own rank (4) over the run
    # config's (2), so the ranks are unequal only if node configs reach the server.
    procs = Processes(tmp_path)
    link = free_port()
    write_connection(tmp_path, "loop", link)
    overrides = to_run_config(REFERENCE.replace(ranks="2"), FlowerOptions(str(tmp_path / "out"), 240.0, 120.0))
    try:
        start_superlink(procs, link)
        for pid, node_config in ((0, "partition-id=0 num-partitions=2"), (1, "partition-id=1 num-partitions=2 rank=4")):
            start_supernode(procs, f"supernode{pid}", link, node_config, "--insecure")
        # The in-process reference runs while the nodes wait on Flower's 3-second polls.
        run_and_check(procs, "loop", overrides, [], timeout=480, meanwhile=lambda: request.getfixturevalue("reference"))
    finally:
        left = procs.stop()
    assert not left, f"process groups {left} survived SIGTERM and SIGKILL"
    assert_same_run(tmp_path / "out", request.getfixturevalue("reference"))


def ray_importable() -> bool:
    return importlib.util.find_spec("ray") is not None


@pytest.mark.slow
@pytest.mark.skipif(not ray_importable(), reason="Flower's simulation engine needs Ray: pip install -e '.[simulation]'")
def test_simulation_engine_matches_the_in_process_run(tmp_path, reference):
    # The SuperLink of `flwr run . local`, started here (not detached by flwr) so the test
    # can stop it: simulation mode, the app's ClientApps on 2 virtual nodes under Ray.
    procs = Processes(tmp_path)
    link, control = free_port(), free_port()
    write_connection(tmp_path, "sim", link)
    overrides = to_run_config(REFERENCE, FlowerOptions(str(tmp_path / "out"), 240.0, 120.0))
    try:
        start_superlink(
            procs, link, "--simulation", "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{control}"
        )
        run_and_check(procs, "sim", overrides, ["--federation-config", "num-supernodes=2"], timeout=480)
    finally:
        left = procs.stop()
    assert not left, f"process groups {left} survived SIGTERM and SIGKILL"
    assert_same_run(tmp_path / "out", reference)
