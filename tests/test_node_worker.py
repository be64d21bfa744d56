"""The node worker (a long-lived process that keeps the backbone loaded for a Flower node)
and what a node keeps of its own state: only what the server accepted."""

from __future__ import annotations

import json
import os
import socket as _socket
import threading
from multiprocessing.connection import Client
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower app needs the optional extra: pip install -e '.[flower]'")

from flwr.app import ConfigRecord, RecordDict

import glora.flower.training as training
from glora.federation.simulation import Federation
from glora.flower.config import FlowerOptions, to_run_config
from glora.flower.loopback import Processes, start_node_worker
from glora.flower.node_worker import forward, key_file, serve
from glora.flower.records import encode
from glora.flower.server_app import run_server
from glora.flower.training import OWN, PENDING, PENDING_ROUND
from tests.test_flower import REFERENCE, LoopbackGrid, assert_same_run


def serving(socket, handle, requests):
    """A worker thread serving ``requests`` requests on ``socket``; returns once it listens."""
    ready = threading.Event()
    t = threading.Thread(target=serve, args=(socket, handle, ready.set, requests), daemon=True)
    t.start()
    assert ready.wait(10)
    return t


def test_a_forwarded_request_gets_the_handlers_answer_and_errors_come_back_as_errors(tmp_path):
    def handle(request):
        if request == "boom":
            raise ValueError("bad request")
        return (request * 2,)

    sock = tmp_path / "w.sock"
    t = serving(sock, handle, 3)
    assert oct(key_file(sock).stat().st_mode & 0o777) == "0o600"  # readable by the node's user alone
    assert forward(sock, (21,), 30) == ((21, 21),)
    with pytest.raises(RuntimeError, match="node worker: ValueError: bad request"):
        forward(sock, "boom", 30)
    # A process without the key is refused, and the worker goes on serving the node.
    with pytest.raises(Exception, match="digest"):
        Client(str(sock), family="AF_UNIX", authkey=b"not the key")
    assert forward(sock, (1,), 30) == ((1, 1),)
    t.join(10)
    assert not t.is_alive() and not sock.exists() and not key_file(sock).exists()


def test_without_a_worker_the_error_names_the_socket_and_the_command(tmp_path):
    with pytest.raises(ConnectionError, match=r"no node worker answers on .*w\.sock.*glora node-worker --socket"):
        forward(tmp_path / "w.sock", ("x",), 30)


def test_a_second_worker_on_a_served_socket_is_refused_and_a_dead_ones_socket_is_replaced(tmp_path):
    sock = tmp_path / "w.sock"
    t = serving(sock, lambda r: (r,), 1)
    with pytest.raises(FileExistsError, match=r"a node worker is serving .*w\.sock already"):
        serve(sock, lambda r: (r,))
    forward(sock, (0,), 30)
    t.join(10)
    # What a killed worker leaves: a socket nobody listens on, and its key.
    dead = _socket.socket(_socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()
    key_file(sock).write_bytes(b"stale")
    t = serving(sock, lambda r: (r,), 1)
    assert forward(sock, (5,), 30) == ((5,),)
    t.join(10)


def test_a_key_others_can_read_is_not_trusted(tmp_path):
    sock = tmp_path / "w.sock"
    t = serving(sock, lambda r: (r,), 1)
    key_file(sock).chmod(0o644)
    with pytest.raises(ConnectionError, match=r"not readable by this user alone .*mode 0o644"):
        forward(sock, (0,), 30)
    key_file(sock).chmod(0o600)
    forward(sock, (0,), 30)
    t.join(10)


def test_a_request_is_bounded_by_the_rounds_timeout(tmp_path):
    """A worker busy past the round's timeout: the ClientApp stops waiting, and a request
    whose deadline passed before the worker took it is not trained."""
    release = threading.Event()
    calls = []

    def busy(request):
        calls.append(request)
        release.wait(30)  # busy until the test has seen the ClientApp give up
        return (request,)

    sock = tmp_path / "w.sock"
    t = serving(sock, busy, 2)
    # On a loaded machine the worker may take the request only after its second has passed:
    # then it answers "not trained" at once. Either way the ClientApp waits no longer.
    with pytest.raises((TimeoutError, RuntimeError), match=r"did not answer within 1 s|timeout passed"):
        forward(sock, ("first",), 1.0)
    threading.Timer(1.0, release.set).start()  # the worker finishes "first" a second from now
    with pytest.raises(TimeoutError, match=r"did not answer within 0\.5 s"):
        forward(sock, ("late",), 0.5)  # it waited for the worker past its deadline: not sent
    t.join(10)
    assert ("late",) not in calls


def test_a_node_keeps_its_own_state_of_a_round_only_if_the_server_kept_that_rounds_update():
    trained = encode(head={"w": __import__("torch").ones(2)})
    for kept, keeps in ((3, True), (2, False), (0, False)):
        state = RecordDict({PENDING: trained, PENDING_ROUND: ConfigRecord({"round": 3})})
        training._commit_own(state, kept)
        assert (OWN in state) == keeps and PENDING not in state and PENDING_ROUND not in state


@pytest.mark.slow
def test_a_node_whose_update_the_server_rejected_trains_on_without_it(tmp_path, task_identity, monkeypatch):
    # FedSA-LoRA keeps B and the head on the node. The server rejects node 11's round-1 reply
    # (its example count is off): the in-process driver would not keep that client's round-1
    # state, so in round 2 the node must start from the readout alone, not from what it kept.
    cfg = REFERENCE.replace(rule="fedsa-lora", ranks="4", rounds=3, local_steps=1, eval_every=3)
    run_config = to_run_config(cfg, FlowerOptions(str(tmp_path / "flower")))
    seen: list[tuple[int, int, bool]] = []
    real = training.train_client

    def spy(model, task, cfg, rule, server_round, client, examples, factors, head, own):
        seen.append((server_round, client, own is not None))
        return real(model, task, cfg, rule, server_round, client, examples, factors, head, own)

    monkeypatch.setattr(training, "train_client", spy)

    class Rejecting(LoopbackGrid):
        def answer(self, msg):
            reply = super().answer(msg)
            if msg.metadata.dst_node_id == 11 and msg.content["config"].get("server-round") == 1:
                reply.content["metrics"]["num-examples"] += 1
            return reply

    nodes = {11: {"partition-id": 0, "num-partitions": 2}, 7: {"partition-id": 1, "num-partitions": 2}}
    run_server(Rejecting(run_config, nodes), run_config, run_id=1)
    own = {(r, c): has for r, c, has in seen}
    assert own == {(1, 0): False, (1, 1): False, (2, 0): False, (2, 1): True, (3, 0): True, (3, 1): True}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["glora", "fedsa-lora"])
def test_nodes_with_a_worker_run_like_the_in_process_run_and_load_the_model_once(tmp_path, task_identity, rule, caplog):
    # GLoRA over ranks 2 and 4; FedSA-LoRA keeps B and the head on the node, which goes to
    # the worker and back with every message (pending, then kept), 3 rounds of one client
    # in two, so a node's own state waits out a round it is not sampled in.
    cfg = REFERENCE
    if rule == "fedsa-lora":
        cfg = REFERENCE.replace(rule=rule, ranks="4", rounds=3, fraction=0.5, local_steps=2, eval_every=3)
    Federation(cfg, tmp_path / "reference", progress=False).run()
    sock = tmp_path / "worker.sock"
    procs = Processes(tmp_path, cache=Path(os.environ.get("GLORA_CACHE_DIR", tmp_path / "cache")))
    try:
        start_node_worker(procs, "worker", sock)
        run_config = to_run_config(cfg, FlowerOptions(str(tmp_path / "flower")))
        worker_at = {"worker": str(sock)}
        nodes = {
            11: {"partition-id": 0, "num-partitions": 2, **worker_at},
            7: {"partition-id": 1, "num-partitions": 2, **worker_at},
        }
        grid = LoopbackGrid(run_config, nodes)
        summary = run_server(grid, run_config, run_id=1)
    finally:
        left = procs.stop()
    assert not left, f"process groups {left} survived SIGTERM and SIGKILL"
    assert_same_run(tmp_path / "flower", tmp_path / "reference")
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["final"] == reference["final"] and summary["final_personal"] == reference["final_personal"]
    out = (tmp_path / "worker.log").read_text()
    # Every message answered by one process that loaded one model with the run's ranks.
    rows = [json.loads(line) for line in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert out.count("answered in") == sum(len(r["clients"]) for r in rows), out
    ranks = sorted(set(cfg.client_ranks()))
    assert out.count(f"loaded the task and a model of minilm with ranks {ranks}") == 1, out
    assert "trained without its own state" not in caplog.text  # every node kept what the server kept
    if rule == "fedsa-lora":
        assert all(OWN in state for state in grid.states.values() if state)
    assert not sock.exists()  # SIGTERM: the worker removed its socket and key
