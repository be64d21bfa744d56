"""A Flower deployment on this machine's loopback: a SuperLink and SuperNodes as processes,
for the deployment tests and benchmarks (and anyone trying a deployment before spreading it
over machines). Each process runs in its own process group, which ``stop`` takes down with
whatever Flower spawned under it (SuperExec, ClientApp processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The processes of one loopback deployment, each in its own process group (a SuperLink
    or SuperNode spawns helper processes, which the group takes down with it); their logs
    are ``<folder>/<name>.log``."""

    def __init__(self, folder: Path, cache: Path | None = None) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen] = []
        venv_bin = str(Path(sys.executable).parent)  # SuperLink/SuperNode spawn flower-superexec by name
        self.env = {
            **os.environ,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "GLORA_CACHE_DIR": str(cache or folder / "cache"),
        }

    def start(self, name: str, args: list[str], flwr_home: str) -> subprocess.Popen:
        env = {**self.env, "FLWR_HOME": str(self.folder / flwr_home)}
        with (self.folder / f"{name}.log").open("w") as log:
            p = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder, start_new_session=True
            )
        self.started.append(p)
        return p

    def flwr(self, *args: str, timeout: float) -> str:
        """A `flwr` CLI command with this test's CLI home; its output."""
        env = {**self.env, "FLWR_HOME": str(self.folder / "cli")}
        out = subprocess.run(
            ["flwr", *args], env=env, cwd=self.folder, capture_output=True, text=True, timeout=timeout, check=False
        )
        return out.stdout + out.stderr

    def stop(self, wait: float = 15.0) -> list[int]:
        """SIGTERM every live group, SIGKILL what is left after ``wait`` s (bounded: at most
        2 * wait s); returns the groups still alive."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        return self.alive()

    def alive(self) -> list[int]:
        out = []
        for p in self.started:
            p.poll()  # reap the leader
            try:
                os.killpg(p.pid, 0)
                out.append(p.pid)
            except ProcessLookupError:
                pass
        return out


def wait_healthy(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the SuperLink on port {port} did not answer /health within {timeout} s")


def start_superlink(procs: Processes, port: int, *options: str) -> None:
    """A loopback SuperLink on ``port`` (Fleet API), with ``options``; returns once healthy."""
    procs.start(
        "superlink",
        [
            "flower-superlink",
            "--insecure",
            *options,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        "link",
    )
    wait_healthy(port, 60)


def start_supernode(procs: Processes, name: str, link: int, node_config: str, *options: str) -> subprocess.Popen:
    """A SuperNode of the SuperLink on ``link`` with ``node_config`` and ``options`` (e.g.
    ``--insecure``), its log ``<name>.log`` and its Flower home a folder named ``name``."""
    args = ["flower-supernode", *options, "--superlink", f"127.0.0.1:{link}", "--port", str(free_port())]
    return procs.start(name, [*args, "--node-config", node_config], name)


def start_node_worker(procs: Processes, name: str, socket_path: Path, timeout: float = 120.0) -> subprocess.Popen:
    """A ``glora node-worker`` on ``socket_path``; returns once it serves (its key exists)."""
    from glora.flower.node_worker import key_file

    worker = procs.start(name, [sys.executable, "-m", "glora.cli", "node-worker", "--socket", str(socket_path)], name)
    deadline = time.monotonic() + timeout
    while not key_file(socket_path).exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            log = (procs.folder / f"{name}.log").read_text()
            raise RuntimeError(f"the node worker on {socket_path} did not start within {timeout} s:\n{log[-2000:]}")
        time.sleep(0.2)
    return worker


def write_connection(folder: Path, name: str, port: int) -> None:
    (folder / "cli").mkdir(exist_ok=True)
    (folder / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
