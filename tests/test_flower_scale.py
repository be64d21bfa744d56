"""Flower's simulation engine at scale: 200 virtual nodes on 2 Ray actors, 5% of them (10)
sampled a round, 2 rounds, checked against the in-process simulation of the same config."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

pytest.importorskip("flwr", reason="the Flower app needs the optional extra: pip install -e '.[flower]'")

import psutil
from flwr.app import Error, Message

from glora.federation.engine import sample_clients
from glora.federation.simulation import Federation
from glora.flower.config import FlowerOptions, to_run_config
from glora.flower.loopback import Processes, free_port, start_superlink, write_connection
from glora.flower.strategy import discover_nodes
from tests.test_flower import REFERENCE, FakeGrid, assert_same_run, make_strategy, ray_importable, run_and_check

NODES = 200
# Each actor is one Ray worker process running ClientApps one message at a time; Flower's
# pool holds init-args-num-cpus / client-resources-num-cpus actors (by default all the
# machine's CPUs over 2 per client: 1 actor on 2 cores, 8 on 16). Pinned to 2 on any machine.
ACTORS = 2
FEDERATION = f"num-supernodes={NODES} client-resources-num-cpus=1 init-args-num-cpus={ACTORS}"
# Tiny local work: one step of 8 examples. The one-pass split gives 200 clients >= 10
# examples each out of 4,000 in one draw (the resample scheme redraws until every client
# holds enough, which hundreds of clients almost never do).
SCALE = REFERENCE.replace(
    clients=NODES,
    fraction=0.05,
    alpha=0.5,
    partition_scheme="one-pass",
    min_client_examples=10,
    max_train_examples=4000,
    local_steps=1,
    batch_size=8,
)


class TreeSampler(threading.Thread):
    """Samples, every ``every`` s, the summed RSS of the process trees ``procs`` started (the
    SuperLink and everything it starts: the simulation process, Ray, its actors; the flwr
    CLI) and counts Ray's ClientApp actors."""

    def __init__(self, procs: Processes, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.procs, self.every = procs, every
        self.peak_rss = 0
        self.actors = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            procs = []
            for started in list(self.procs.started):
                try:
                    root = psutil.Process(started.pid)
                    procs += [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
            rss, actors = 0, 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    actors += any("ClientAppActor" in part for part in p.cmdline()[:1])
                except psutil.Error:
                    continue
            self.peak_rss, self.actors = max(self.peak_rss, rss), max(self.actors, actors)


@pytest.mark.slow
@pytest.mark.skipif(not ray_importable(), reason="Flower's simulation engine needs Ray: pip install -e '.[simulation]'")
def test_simulation_engine_runs_200_virtual_nodes_on_2_actors(tmp_path):
    procs = Processes(tmp_path)
    link, control = free_port(), free_port()
    write_connection(tmp_path, "sim", link)
    out = tmp_path / "out"
    overrides = to_run_config(SCALE, FlowerOptions(str(out), 240.0, 120.0))
    sampler = TreeSampler(procs)
    sampler.start()
    started = time.monotonic()
    try:
        start_superlink(
            procs, link, "--simulation", "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{control}"
        )
        run_and_check(procs, "sim", overrides, ["--federation-config", FEDERATION], timeout=600)
        flower_seconds = time.monotonic() - started
    finally:
        left = procs.stop()
        sampler.done.set()
    assert not left, f"process groups {left} survived SIGTERM and SIGKILL"
    print(
        f"{NODES} nodes, {ACTORS} actors: the Flower run took {flower_seconds:.0f} s (SuperLink start to status); "
        f"peak RSS of its process trees {sampler.peak_rss / 2**20:.0f} MiB; {sampler.actors} ClientApp actors seen"
    )
    assert sampler.actors == ACTORS  # the pool Flower built, whatever the machine's CPU count

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [len(r["clients"]) for r in rows] == [10, 10]
    assert [r["clients"] for r in rows] == [sample_clients(NODES, t, SCALE.fraction, SCALE.seed) for t in (1, 2)]
    assert (out / "summary.json").exists()
    # The in-process driver on the same config: the same clients, example counts, losses and
    # global update (one thread on every side: the same kernels in the same order).
    started = time.monotonic()
    Federation(SCALE, tmp_path / "reference", progress=False).run()
    print(f"the in-process run of the same config took {time.monotonic() - started:.0f} s")
    assert_same_run(out, tmp_path / "reference")
    assert json.loads((out / "config.json").read_text())["clients"] == NODES


def test_discovery_errors_and_the_run_summary_stay_short_at_200_nodes(task_identity, caplog):
    # 200 SuperNodes for a run of 100 clients: every node refuses alike. The error names the
    # reason once with a few of its nodes (it listed all 200: 35,000 characters).
    reason = "<class 'ValueError'>:<'node config num-partitions=200 but the run config has clients=100'>"

    class Refusing(FakeGrid):
        def answer(self, msg):
            return Message(Error(code=2, reason=reason), reply_to=msg)

    with pytest.raises(ValueError) as refused:
        discover_nodes(Refusing(range(1000, 1200), {}), 100, timeout=5)
    message = str(refused.value)
    assert message.count(reason) == 1 and len(message) < 600
    assert (
        "partitions [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19 and 80 more] of 100"
        in message
    )
    assert "200 of 200 nodes replied; nodes [1000, 1001, 1002 and 197 more]: " in message
    # The strategy's summary counts the ranks of 200 nodes instead of listing them (12,000 characters).
    with caplog.at_level(logging.INFO, logger="flwr.glora"):
        make_strategy("glora", [2, 4] * 100).summary()
    assert "glora rule 'glora' over 200 nodes: rank 2: 100 clients, rank 4: 100 clients" in caplog.text
