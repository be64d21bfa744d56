"""Flower's deployment engine as a real federation runs it, on loopback: TLS with SuperNode
authentication (two registered nodes run the app, an unregistered one is refused); a
SuperLink with persistent state (--database) that is killed mid-run and restarted, whose
nodes reconnect under their ids and whose run the app resumes (-c resume=true) to the
uninterrupted result; and, for contrast, an in-memory SuperLink whose restart its nodes do
not survive. The app runs are checked against the in-process simulation of the same config
(``REFERENCE``), and the README's Flower commands against flwr's own parsers."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import re
import shlex
import signal
import ssl
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr", reason="the Flower app needs the optional extra: pip install -e '.[flower]'")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from glora.flower.config import FlowerOptions, run_config_overrides, to_run_config
from glora.flower.loopback import start_supernode
from tests.test_flower import (
    REFERENCE,
    ROOT,
    Processes,
    assert_same_run,
    free_port,
    reference,  # noqa: F401  (the module-scoped fixture: the in-process run of REFERENCE)
    run_and_check,
    start_superlink,
    write_connection,
)

# -- certificates and node keys --------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost it signed (P-384, PEM), as
    ``--ssl-ca-certfile``, ``--ssl-certfile`` and ``--ssl-keyfile`` take them."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("glora test CA"))
        .issuer_name(_name("glora test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def make_node_key(folder: Path, stem: str) -> Path:
    """A SuperNode's key pair as flwr 1.42 reads them: the private key in OpenSSH format
    (``--auth-supernode-private-key``), the public key ``<stem>.pub`` in OpenSSH format
    (``flwr supernode register``), on a NIST curve (P-384). Returns the private key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / stem
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    (folder / f"{stem}.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private


# -- a TLS SuperLink ---------------------------------------------------------------------------


def wait_healthy_tls(port: int, ca: Path, timeout: float) -> None:
    """The SuperLink answers /health over HTTPS with a certificate the CA signed."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the SuperLink on port {port} did not answer /health over TLS within {timeout} s")


def write_tls_connection(folder: Path, name: str, port: int, ca: Path) -> None:
    """The `flwr` CLI's connection: TLS, the CA by absolute path (flwr 1.42 refuses a relative one)."""
    (folder / "cli").mkdir(exist_ok=True)
    (folder / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n'
        f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca.resolve()}"\n'
    )


def node_id_in_log(procs: Processes, name: str, timeout: float) -> int:
    """The node id a SuperNode logs once the SuperLink accepted it."""
    deadline = time.monotonic() + timeout
    log = procs.folder / f"{name}.log"
    while time.monotonic() < deadline:
        if found := re.search(r"SuperNode ID: (\d+)", log.read_text()):
            return int(found.group(1))
        time.sleep(0.3)
    raise AssertionError(f"{name} logged no node id within {timeout} s:\n{log.read_text()[-2000:]}")


def listed_nodes(procs: Processes, connection: str) -> dict[int, str]:
    """`flwr supernode ls`: node id -> status."""
    out = procs.flwr("supernode", "ls", connection, "--format", "json", timeout=60)
    return {int(n["node-id"]): n["status"] for n in json.loads(out)["nodes"]}


def take_down(procs: Processes) -> list[str]:
    """Stop every process group the test started, then every process that still carries this
    test's environment (the SuperLink's SuperExec and the ServerApp it launches run in
    sessions of their own, and exit when their parent does: wait for that, bounded, then kill
    them). Returns what was still alive, for the assertion."""
    left = [f"process group {g}" for g in procs.stop()]
    mine = procs.env["GLORA_CACHE_DIR"]  # one per test: its own tmp_path's

    def strays() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and p.environ().get("GLORA_CACHE_DIR") == mine:
                    out.append(p)
        return out

    deadline = time.monotonic() + 15
    while (found := strays()) and time.monotonic() < deadline:
        time.sleep(0.3)
    for p in found:
        with contextlib.suppress(psutil.Error):
            left.append(f"{p.pid} {' '.join(p.cmdline()[:2])}")
            p.kill()
    return left


# -- the README's Flower commands -------------------------------------------------------------

README = ROOT / "README.md"


def readme_flower_commands() -> list[str]:
    """The README's `flower-superlink`, `flower-supernode` and `flwr` commands (continuation
    lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.split(" ")[0] in ("flower-superlink", "flower-supernode", "flwr"):
                commands.append(line)
    return commands


def test_the_readme_documents_tls_node_authentication_persistence_and_resume():
    text = " ".join(readme_flower_commands())
    for flag in ("--enable-supernode-auth", "--database", "--auth-supernode-private-key", "--root-certificates"):
        assert flag in text
    assert "flwr supernode register" in text and "resume=true" in text


@pytest.mark.parametrize("command", readme_flower_commands())
def test_readme_flower_command_parses(command):
    # flwr's own parsers: an option flwr 1.42 does not have (or a value of the wrong type) fails.
    from flwr.cli.app import app
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    from typer.testing import CliRunner

    args = shlex.split(command.replace("$PWD", "/abs"))
    if args[0] == "flwr":
        result = CliRunner().invoke(app, [*args[1:], "--help"])
        assert result.exit_code == 0, f"{command}\n{result.output}"
    else:
        parser = {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode}
        try:
            parser[args[0]]().parse_args(args[1:])
        except SystemExit as e:  # argparse's answer to an unknown option or a bad value (its message is on stderr)
            pytest.fail(f"{command}: flwr's parser exits with status {e.code}")


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tls_with_node_authentication_runs_registered_nodes_and_refuses_an_unregistered_one(tmp_path, request):
    procs = Processes(tmp_path)
    certs = make_certificates(tmp_path / "certs")
    keys = {name: make_node_key(tmp_path / "certs", name) for name in ("node0", "node1", "stranger")}
    link = free_port()
    write_tls_connection(tmp_path, "tls", link, certs["ca"])
    overrides = to_run_config(REFERENCE, FlowerOptions(str(tmp_path / "out"), 240.0, 120.0))
    tls = ["--root-certificates", str(certs["ca"].resolve())]
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--enable-supernode-auth",
                "--ssl-ca-certfile",
                str(certs["ca"]),
                "--ssl-certfile",
                str(certs["cert"]),
                "--ssl-keyfile",
                str(certs["key"]),
                "--database",
                str(tmp_path / "superlink.db"),
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
                "--disable-runtime-dependency-installation",
            ],
            "link",
        )
        wait_healthy_tls(link, certs["ca"], 60)
        registered = {}
        for name in ("node0", "node1"):
            out = procs.flwr("supernode", "register", f"{keys[name]}.pub", "tls", "--format", "json", timeout=60)
            reply = json.loads(out[out.index("{") :])
            assert reply["success"], out
            registered[name] = int(reply["node-id"])
        assert listed_nodes(procs, "tls") == {n: "registered" for n in registered.values()}
        for pid, name in enumerate(("node0", "node1", "stranger")):
            node_config = f"partition-id={pid % 2} num-partitions=2"
            start_supernode(procs, name, link, node_config, *tls, "--auth-supernode-private-key", str(keys[name]))
        stranger = procs.started[-1]
        # A registered node's id is the one its key was registered under.
        assert {name: node_id_in_log(procs, name, 60) for name in registered} == registered

        def meanwhile():
            request.getfixturevalue("reference")  # the in-process run, while the nodes wait on their polls
            assert stranger.wait(timeout=60) == 1  # flwr_exit's status for an error

        run_and_check(procs, "tls", overrides, [], timeout=480, meanwhile=meanwhile)
        assert set(listed_nodes(procs, "tls")) == set(registered.values())  # the stranger never joined
    finally:
        left = take_down(procs)
    assert not left, f"still alive after SIGTERM and SIGKILL: {left}"
    refused = (tmp_path / "stranger.log").read_text()
    assert "Exit Code: 305" in refused
    assert (
        "Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode." in refused
    )
    assert "SuperNode ID" not in refused
    link_log = (tmp_path / "superlink.log").read_text()
    assert "[/v1/fleet/activate-node][ApiError:2004]" in link_log
    assert "exception: No SuperNode found with the given public key." in link_log
    assert_same_run(tmp_path / "out", request.getfixturevalue("reference"))


def checkpointed_round(out: Path) -> int:
    """The round of the run folder's last metrics row, once its checkpoint exists (0: none yet)."""
    metrics, checkpoint = out / "metrics.jsonl", out / "checkpoint.pt"
    if not (metrics.exists() and checkpoint.exists()):
        return 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return rows[-1]["round"] if rows else 0


def lock_holder(out: Path) -> str | None:
    """Who holds the run folder's lock (what it wrote in ``.lock``), or None when it is free."""
    with (out / ".lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read()
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def run_status(procs: Processes, connection: str, run_id: str) -> str:
    listing = json.loads(procs.flwr("ls", connection, "--run-id", run_id, "--format", "json", timeout=60))
    return listing["runs"][0]["status"]


def wait_for(what: str, condition, timeout: float, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(poll)


@pytest.mark.slow
def test_a_persistent_superlink_killed_mid_run_keeps_its_nodes_and_the_resumed_run_matches(tmp_path, request):
    # The SuperLink keeps its state in a database file; it is SIGKILLed once round 1's
    # checkpoint is written, restarted on the same file, and the run is resumed with
    # -c resume=true. The SuperNodes are never restarted: they reconnect under their ids.
    procs = Processes(tmp_path)
    link = free_port()
    write_connection(tmp_path, "loop", link)
    database = tmp_path / "state" / "superlink.db"
    database.parent.mkdir()
    out = tmp_path / "out"
    overrides = to_run_config(REFERENCE, FlowerOptions(str(out), 240.0, 120.0))
    try:
        start_superlink(procs, link, "--database", str(database))
        superlink = procs.started[-1]
        nodes = [
            start_supernode(procs, f"node{pid}", link, f"partition-id={pid} num-partitions=2", "--insecure")
            for pid in (0, 1)
        ]
        ids = {f"node{pid}": node_id_in_log(procs, f"node{pid}", 60) for pid in (0, 1)}
        # `flwr run` without --stream returns once the run has started.
        started = procs.flwr("run", str(ROOT), "loop", "-c", run_config_overrides(overrides), timeout=120)
        assert "Successfully started run" in started, started
        interrupted = re.search(r"Successfully started run (\d+)", started).group(1)
        request.getfixturevalue("reference")  # the in-process run, while the Flower run starts
        wait_for("round 1's checkpoint", lambda: checkpointed_round(out) >= 1 or superlink.poll() is not None, 300, 0.5)
        assert superlink.poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
        os.killpg(superlink.pid, signal.SIGKILL)
        superlink.wait(timeout=30)
        assert checkpointed_round(out) == 1  # killed mid-run: round 2 has not ended
        (tmp_path / "superlink.log").rename(tmp_path / "superlink-killed.log")
        time.sleep(3)  # the SuperNodes retry their SuperLink meanwhile
        assert all(n.poll() is None for n in nodes), "a SuperNode exited when its SuperLink died"
        # The interrupted run's ServerApp outlives its SuperLink (and its SuperExec, which
        # exits with the SuperLink): it still holds the run folder.
        assert "flwr-serverapp" in (lock_holder(out) or "the lock is free")
        start_superlink(procs, link, "--database", str(database))
        # The SuperNodes come back online under their ids. The interrupted run's ServerApp
        # waited for the SuperLink: it reports its failure, then exits.
        online = {node_id: "online" for node_id in ids.values()}
        wait_for("the SuperNodes back online", lambda: listed_nodes(procs, "loop") == online, 120, 2)
        wait_for(
            "the interrupted run marked failed",
            lambda: run_status(procs, "loop", interrupted) == "finished:failed",
            120,
            2,
        )
        wait_for("the interrupted run's ServerApp to let go of the run folder", lambda: lock_holder(out) is None, 30)
        run_and_check(procs, "loop", {**overrides, "resume": True}, [], timeout=480)
        assert all(n.poll() is None for n in nodes)  # the same SuperNode processes ran round 2
    finally:
        left = take_down(procs)
    assert not left, f"still alive after SIGTERM and SIGKILL: {left}"
    for name, node_id in ids.items():
        log = (tmp_path / f"{name}.log").read_text()
        assert re.findall(r"SuperNode ID: (\d+)", log) == [str(node_id)], log[-3000:]
        assert "Connection successful after" in log  # flwr's retry, once the SuperLink was back
    assert_same_run(out, request.getfixturevalue("reference"))
    meta = json.loads((out / "meta.json").read_text())
    assert [r["after_round"] for r in meta["resumes"]] == [1]


@pytest.mark.slow
def test_an_in_memory_superlink_restarted_forgets_its_nodes_and_they_exit(tmp_path):
    # Without --database a restarted SuperLink no longer knows the node: the node's next
    # call is refused (401) and it exits, with status 0, so only a supervisor that restarts
    # it whatever its status brings it back (under a new id).
    procs = Processes(tmp_path)
    link = free_port()
    write_connection(tmp_path, "loop", link)
    try:
        start_superlink(procs, link)
        superlink = procs.started[-1]
        node = start_supernode(procs, "node0", link, "partition-id=0 num-partitions=1", "--insecure")
        node_id_in_log(procs, "node0", 60)
        os.killpg(superlink.pid, signal.SIGKILL)
        superlink.wait(timeout=30)
        (tmp_path / "superlink.log").rename(tmp_path / "superlink-killed.log")
        start_superlink(procs, link)
        assert node.wait(timeout=120) == 0
        assert listed_nodes(procs, "loop") == {}
        link_log = (tmp_path / "superlink.log").read_text()
    finally:
        left = take_down(procs)
    assert not left, f"still alive after SIGTERM and SIGKILL: {left}"
    # The node's first call to the new SuperLink (a heartbeat or a poll, whichever comes first)
    assert re.search(r'"POST /v1/fleet/(send-node-heartbeat|pull-messages) HTTP/1.1" 401', link_log)
    assert "SuperNode terminated gracefully." in (tmp_path / "node0.log").read_text()


@pytest.mark.slow
def test_a_supernode_killed_after_round_1_and_restarted_takes_its_partition_back(tmp_path):
    # Node 1 is SIGKILLed once round 1 is checkpointed and started again with the same node
    # config: it comes back under a new node id. The round in flight when it died may lose
    # its partition (no reply within round-timeout); the next round asks the new node which
    # partition it serves, and it trains that partition again to the end of the run.
    procs = Processes(tmp_path)
    link = free_port()
    write_connection(tmp_path, "loop", link)
    out = tmp_path / "out"
    cfg = REFERENCE.replace(rounds=4, eval_every=4)
    overrides = to_run_config(cfg, FlowerOptions(str(out), round_timeout=30.0, node_wait=120.0))
    try:
        start_superlink(procs, link)
        start_supernode(procs, "node0", link, "partition-id=0 num-partitions=2", "--insecure")
        first = start_supernode(procs, "node1", link, "partition-id=1 num-partitions=2", "--insecure")
        old_id = node_id_in_log(procs, "node1", 60)

        def restart_node1():
            wait_for("round 1's checkpoint", lambda: checkpointed_round(out) >= 1, 300, 0.5)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            (tmp_path / "node1.log").rename(tmp_path / "node1-killed.log")
            start_supernode(procs, "node1", link, "partition-id=1 num-partitions=2", "--insecure")

        run_and_check(procs, "loop", overrides, [], timeout=600, meanwhile=restart_node1)
        new_id = node_id_in_log(procs, "node1", 10)
    finally:
        left = take_down(procs)
    assert not left, f"still alive after SIGTERM and SIGKILL: {left}"
    assert new_id != old_id
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    missed = [r["round"] for r in rows if 1 not in r["clients"]]
    assert missed in ([], [2]), f"partition 1 was left out of rounds {missed}"  # at most the round in flight
    assert rows[-1]["clients"] == rows[-2]["clients"] == [0, 1]
    streamed = (tmp_path / "flwr-run.log").read_text()
    # Flower still lists the killed node for up to a minute: it is replaced for having missed a round.
    takeover = rf"partition 1: node {new_id} takes over from node {old_id} \((gone|left out of the last round)\)"
    assert re.search(takeover, streamed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["left_out"] == ({"2": [1]} if missed else {})
