"""A long-lived process beside a SuperNode that keeps the backbone loaded across messages.

Flower's deployment engine (flwr 1.42) runs every message in a fresh ClientApp process
(SuperExec launches one task process per message, and ``flwr-clientapp`` serves exactly one
token), so a node that trains in that process imports torch, transformers and peft and loads
the backbone for every round: seconds of overhead for each message, whatever the model.
Flower has no hook to keep a model in memory between messages, so this module adds one:
``glora node-worker --socket PATH`` loads tasks and models on first use and keeps them, and
a node started with ``--node-config "... worker='PATH'"`` has its ClientApp hand each train
message to it over a local socket. The ClientApp process then imports only flwr and the
standard library (:func:`forward`).

The protocol is Python's ``multiprocessing.connection`` (pickled objects over an
authenticated Unix socket): a request is ``(deadline, (run_config, node_config, content,
state))``, the time its round stops waiting, the run's config, the node's config, the train
message's content and the node's
``context.state`` (RecordDicts as plain dicts of NumPy arrays and values, :func:`pack`:
a received message's arrays are memoryviews, which do not pickle); the reply is ``("ok",
content, state)`` or ``("error", text)``. The key that authenticates the ClientApp is written beside
the socket (``PATH.key``, readable by the worker's user alone): the node's processes run as
that user, anyone else is refused, and the ClientApp trusts no key that others could have
written.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket as sock
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

_RECORDS = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}


def key_file(socket: str | Path) -> Path:
    return Path(f"{socket}.key")


def pack(records: RecordDict) -> dict[str, tuple[str, dict[str, Any]]]:
    """A RecordDict as ``{name: (kind, values)}``: arrays as NumPy arrays, configs and metrics
    as their values."""
    out = {}
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            out[name] = ("arrays", {k: record[k].numpy() for k in record})
        else:
            kind = "config" if isinstance(record, ConfigRecord) else "metrics"
            out[name] = (kind, dict(record))
    return out


def unpack(packed: dict[str, tuple[str, dict[str, Any]]]) -> RecordDict:
    """The RecordDict :func:`pack` packed."""
    out = RecordDict()
    for name, (kind, values) in packed.items():
        arrays = kind == "arrays"
        out[name] = ArrayRecord({k: Array(v) for k, v in values.items()}) if arrays else _RECORDS[kind](values)
    return out


def _clear_stale(socket: Path) -> None:
    """Remove the socket and key a worker left when it was killed (nothing answers on the
    socket); FileExistsError when a worker is serving it."""
    if not socket.exists():
        return
    probe = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
    try:
        probe.connect(str(socket))
    except (ConnectionRefusedError, FileNotFoundError):
        socket.unlink(missing_ok=True)
        key_file(socket).unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise FileExistsError(f"a node worker is serving {socket} already: stop it first, or choose another socket")


def serve(
    socket: str | Path,
    handle: Callable[[tuple], tuple],
    ready: Callable[[], None] | None = None,
    stop_after: int | None = None,
) -> None:
    """Answer requests on the Unix socket ``socket`` until SIGTERM or SIGINT (or, given
    ``stop_after``, that many requests), one at a time (a node trains one message at a time),
    with ``handle(request) -> tuple``; an exception in ``handle`` becomes an ``("error",
    text)`` reply and the worker goes on serving. A request whose deadline has passed while
    the worker was busy is answered with an error rather than trained (its round is over).
    The key file appears once the socket listens: it is the sign that the worker is ready."""
    socket = Path(socket)
    _clear_stale(socket)
    key = secrets.token_bytes(32)
    kf = key_file(socket)
    listener = Listener(str(socket), family="AF_UNIX", authkey=key)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Signal handlers can only be set from the main thread (a test may serve from another).
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        tmp = kf.with_name(f".{kf.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(tmp, kf)
        if ready is not None:
            ready()
        served = 0
        while stop_after is None or served < stop_after:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a client that failed authentication or hung up
                continue
            with conn:
                served += 1
                try:
                    deadline, request = conn.recv()
                except (OSError, EOFError, ValueError, TypeError):
                    continue
                if time.time() > deadline:
                    reply = ("error", "the round's timeout passed while the worker was busy: not trained")
                else:
                    try:
                        reply = ("ok", *handle(request))
                    except Exception as e:  # the ClientApp turns it into the node's error reply
                        reply = ("error", f"{type(e).__name__}: {e}")
                try:
                    conn.send(reply)
                except (OSError, EOFError):
                    continue
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        listener.close()
        socket.unlink(missing_ok=True)
        kf.unlink(missing_ok=True)


def forward(socket: str | Path, request: tuple, timeout: float) -> tuple:
    """Send ``request`` to the worker on ``socket`` and wait at most ``timeout`` seconds (the
    round's); its reply without the "ok". RuntimeError with the worker's message for an
    error reply; ConnectionError naming the socket and what to do when no worker answers,
    or when the key is not this user's alone (someone else could stand in for the worker);
    TimeoutError when it does not answer in time."""
    deadline = time.time() + timeout
    kf = key_file(socket)
    try:
        info = kf.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConnectionError(
                f"{kf} is not readable by this user alone (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): "
                "refusing to trust it; keep the worker's socket in a private (0700) folder"
            )
        conn = Client(str(socket), family="AF_UNIX", authkey=kf.read_bytes())
    except OSError as e:
        raise ConnectionError(
            f"no node worker answers on {socket} ({e}): start one with `glora node-worker --socket {socket}` "
            "on this node, or remove worker= from the SuperNode's --node-config"
        ) from None
    # Connecting waits for the worker to take the connection, i.e. for its current request to end.
    late = TimeoutError(f"the node worker on {socket} did not answer within {timeout:g} s")
    with conn:
        if time.time() > deadline:
            raise late
        try:
            conn.send((deadline, request))
            if not conn.poll(max(0.0, deadline - time.time())):
                raise late
            reply = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise ConnectionError(f"the node worker on {socket} closed the connection (did it die?)") from None
    if reply[0] == "error":
        raise RuntimeError(f"node worker: {reply[1]}")
    return reply[1:]
