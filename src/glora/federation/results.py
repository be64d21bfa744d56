"""A run's folder: resolved config, provenance, per-round metrics (JSON lines), checkpoints
and a summary. Every table is built from these files, so each number traces to a command.
:class:`RunStore` writes them while a run is made; :func:`open_run` reads a finished one and
never writes."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import glora
from glora.federation.config import RunConfig
from glora.files import atomic_torch_save, atomic_write
from glora.tracking import IDS_FILE

if TYPE_CHECKING:
    from glora.federation.client_store import ClientStore

CONFIG, META, METRICS, CHECKPOINT, SUMMARY, ADAPTER, UPDATES = (
    "config.json",
    "meta.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "summary.json",
    "adapter",
    "updates",  # --record-updates: one file a round, updates/round-NNN.pt
)
# The checkpoint's key naming each client's state file in clients/ (glora.federation.client_store).
CLIENT_FILES = "client_files"


def git_commit() -> str:
    """The commit of the package's source tree ('+dirty' if it has uncommitted changes)."""
    root = Path(glora.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def run_device(meta: dict[str, Any]) -> str | None:
    """The device type a run trained on, from its meta.json: the recorded ``device``, or for
    runs made before it was recorded, the torch build's tag ("+cpu" or "+cuNNN"); None where
    neither says."""
    if meta.get("device"):
        return str(meta["device"])
    build = str(meta.get("torch", "")).partition("+")[2]
    if build == "cpu":
        return "cpu"
    if build.startswith("cu"):
        return "cuda"
    return None


def provenance(command: list[str] | None, device: str | None) -> dict[str, Any]:
    """How and where this process runs: the code, the command (default: this process's argv),
    the time, the software and the torch device type; what meta.json records of a run's start
    and of each resume."""
    return {
        "glora_version": glora.__version__,
        "git_commit": git_commit(),
        "command": command if command is not None else sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": device,
    }


class RunStore:
    """The files of one run folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def start(
        self, config: dict[str, Any], identity: str, command: list[str] | None = None, device: str | None = None
    ) -> None:
        """Write config.json and meta.json (how and where the run was made: ``device`` is the
        torch device type the model trains on, which the config's "auto" leaves open)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path(IDS_FILE).unlink(missing_ok=True)  # a run begun again is a new tracked run
        write_json(self.path(CONFIG), {"identity": identity, **config})
        write_json(self.path(META), provenance(command, device))

    def note_resume(self, after_round: int, command: list[str] | None = None, device: str | None = None) -> None:
        """Add to meta.json where and from which code a run went on after ``after_round``: a
        resumed run may mix commits and machines, and its meta says so."""
        meta = self.meta() or {}
        resumes = [*meta.get("resumes", []), {"after_round": after_round, **provenance(command, device)}]
        write_json(self.path(META), {**meta, "resumes": resumes})

    def _read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        return json.loads(p.read_text()) if p.exists() else None

    def meta(self) -> dict[str, Any] | None:
        return self._read_json(META)

    def config(self) -> dict[str, Any] | None:
        return self._read_json(CONFIG)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.path(METRICS).open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl. A torn last line (a crash while appending it: no final
        newline, not JSON) is left out (:meth:`torn_metrics_line` says so); any other line that
        is not JSON is a ValueError naming the file and line."""
        p = self.path(METRICS)
        if not p.exists():
            return []
        text = p.read_text()
        lines = text.split("\n")
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == len(lines) and not text.endswith("\n"):
                    break  # torn: the crash came mid-line; the round runs again
                raise ValueError(f"{p}, line {number}: not a JSON metrics row ({e.msg}); the file is damaged") from None
        return rows

    def torn_metrics_line(self) -> bool:
        """Whether metrics.jsonl ends in a partial line that :meth:`metrics` leaves out."""
        p = self.path(METRICS)
        if not p.exists():
            return False
        text = p.read_text()
        last = text.rsplit("\n", 1)[-1]
        if not last.strip():
            return False
        try:
            json.loads(last)
        except json.JSONDecodeError:
            return True
        return False

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder for this process (an exclusive lock on ``.lock``): a second
        process that writes the same run is refused, naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(".lock")
        with path.open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise ValueError(
                    f"{self.folder} is being written by {holder}: wait for it to finish, or stop it, or choose "
                    "another --out"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} ({' '.join(sys.argv[:3])})")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only rounds <= last_round (a crash between metrics and checkpoint repeats a round)."""
        kept = [r for r in self.metrics() if r["round"] <= last_round]
        atomic_write(self.path(METRICS), "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``{"state": ServerState, ...}`` atomically. Where the state keeps the clients'
        own states in a :class:`~glora.federation.client_store.ClientStore`, the pending ones
        are written to their files first and the checkpoint names each client's file
        (``CLIENT_FILES``: client -> the round of its file) instead of copying the tensors;
        the files it no longer names are deleted after it is written."""
        from glora.federation.client_store import ClientStore

        st = state.get("state")
        clients = getattr(st, "personal", None)
        if isinstance(clients, ClientStore):
            clients.flush(st.round)
            state = {**state, "state": dataclasses.replace(st, personal={}), CLIENT_FILES: clients.reference()}
        atomic_torch_save(self.path(CHECKPOINT), state)
        if isinstance(clients, ClientStore):
            clients.prune()

    def client_store(self, versions: dict[int, int] | None = None, pending: dict | None = None) -> ClientStore:
        """The run's :class:`~glora.federation.client_store.ClientStore` (``clients/``)."""
        from glora.federation.client_store import CLIENTS, ClientStore

        return ClientStore(self.path(CLIENTS), versions, pending)

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path(CHECKPOINT)
        if not p.exists():
            return None
        try:
            # Our own file: LayerState objects are pickled dataclasses of tensors.
            ckpt = torch.load(p, weights_only=False)
        except Exception as e:  # a truncated or empty file raises pickle, zip or EOF errors
            raise ValueError(
                f"{p} is damaged ({type(e).__name__}); delete it to begin the run again from round 1, or restore it"
            ) from None
        from glora.federation.engine import ClientState  # checkpoints hold the engine's records

        st = ckpt["state"]
        # Checkpoints of older versions held the clients' states inline (as dicts before
        # ClientState): they stay in memory until the next checkpoint writes them to files.
        inline = {i: ClientState.of(own) for i, own in st.personal.items()}
        st.personal = self.client_store(ckpt.get(CLIENT_FILES, {}), inline)
        return ckpt

    def save_updates(self, server_round: int, record: dict[str, Any]) -> None:
        """Store one round's client updates (``--record-updates``), atomically."""
        path = self.path(UPDATES) / f"round-{server_round:03d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, record)

    def recorded_rounds(self) -> list[int]:
        """The rounds whose client updates are stored, in order."""
        folder = self.path(UPDATES)
        return sorted(int(p.stem.removeprefix("round-")) for p in folder.glob("round-*.pt")) if folder.is_dir() else []

    def load_updates(self, server_round: int) -> dict[str, Any]:
        """One round's stored client updates (see :meth:`save_updates`)."""
        path = self.path(UPDATES) / f"round-{server_round:03d}.pt"
        if not path.exists():
            raise ValueError(f"{path} does not exist: the run recorded rounds {self.recorded_rounds() or 'none'}")
        return torch.load(path, weights_only=True)

    def truncate_updates(self, last_round: int) -> None:
        """Drop the recorded updates of rounds after ``last_round`` (a resumed run repeats them)."""
        for t in self.recorded_rounds():
            if t > last_round:
                (self.path(UPDATES) / f"round-{t:03d}.pt").unlink()

    def finish(self, summary: dict[str, Any]) -> None:
        write_json(self.path(SUMMARY), summary)

    def summary(self) -> dict[str, Any] | None:
        return self._read_json(SUMMARY)


@dataclass(frozen=True)
class SavedRun:
    """A run folder as :func:`open_run` read it. ``summary`` is None for a run that has not
    finished; ``adapter`` (the exported peft folder) and ``checkpoint`` (the last state, which
    probes of a run's final model load) are None where the folder does not keep them, as the
    run folders committed under results/ do not."""

    folder: Path
    config: RunConfig
    meta: dict[str, Any]
    metrics: tuple[dict[str, Any], ...]
    summary: dict[str, Any] | None
    adapter: Path | None
    checkpoint: Path | None


def open_run(folder: Path | str) -> SavedRun:
    """Read the run in ``folder`` without writing anything (no lock, no meta.json note, no
    truncated metrics), unlike ``Federation.begin(resume=True)``, which makes the folder its
    own. FileNotFoundError naming the folder and the files it lacks where it is not a run
    folder (config.json, meta.json and metrics.jsonl, which every run writes on starting)."""
    store = RunStore(Path(folder))
    if not store.folder.is_dir():
        raise FileNotFoundError(f"{store.folder} is not a run folder: it does not exist")
    missing = [name for name in (CONFIG, META, METRICS) if not store.path(name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{store.folder} is not a run folder: it has no {', '.join(missing)} (a run folder holds "
            f"{CONFIG}, {META} and {METRICS}, and {SUMMARY} once the run has finished)"
        )
    adapter, checkpoint = store.path(ADAPTER), store.path(CHECKPOINT)
    return SavedRun(
        folder=store.folder,
        config=RunConfig.from_saved(store.config()),
        meta=store.meta(),
        metrics=tuple(store.metrics()),
        summary=store.summary(),
        adapter=adapter if adapter.is_dir() else None,
        checkpoint=checkpoint if checkpoint.is_file() else None,
    )
