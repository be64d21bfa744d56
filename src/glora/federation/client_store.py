"""Each client's own state (its factors and head: personalised rules, a pruned rank) in files
of the run folder instead of memory, so that a run of thousands of clients holds only the
states of a round's clients (issue #33).

A client's state lives in ``<run>/clients/<client>-r<round>.pt``, the round it was written
in, as plain tensors (loadable with ``weights_only``). The run's checkpoint names the file of
every client by that round (:meth:`ClientStore.reference`), so a checkpoint of round t reads
the clients' states as of round t even if a later round was cut after writing some of its
own files; the files a checkpoint no longer names are deleted only after it is written
(:meth:`ClientStore.prune`). Writing a round's states again (a resumed round) replaces the
file atomically with the same content.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from glora.federation.engine import ClientState
from glora.files import atomic_torch_save
from glora.lowrank import LowRank

CLIENTS = "clients"  # the store's folder in a run folder
_FILE = re.compile(r"(\d+)-r(\d+)\.pt")


class ClientStore(MutableMapping[int, ClientState]):
    """The clients' own states by client index, as :attr:`ServerState.personal` holds them.

    ``versions``: the round whose file holds each client's state (what a checkpoint names);
    ``pending``: states set since the last :meth:`flush` (a round's clients, or the states an
    older checkpoint held inline), the only ones kept in memory. Reading a client not pending
    loads its file; nothing read is kept.
    """

    def __init__(
        self,
        folder: Path,
        versions: Mapping[int, int] | None = None,
        pending: Mapping[int, ClientState] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.versions: dict[int, int] = {int(i): int(v) for i, v in (versions or {}).items()}
        self.pending: dict[int, ClientState] = dict(pending or {})

    def path(self, client: int, version: int) -> Path:
        return self.folder / f"{client}-r{version}.pt"

    # -- the mapping ------------------------------------------------------------------------------
    def __getitem__(self, client: int) -> ClientState:
        if client in self.pending:
            return self.pending[client]
        if client not in self.versions:
            raise KeyError(client)
        path = self.path(client, self.versions[client])
        try:
            saved = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"{path} is missing: the run's checkpoint names it as client {client}'s state; restore it, or "
                "delete checkpoint.pt to begin the run again from round 1"
            ) from None
        except Exception as e:  # a truncated or empty file raises pickle, zip or EOF errors
            raise ValueError(f"{path} is damaged ({type(e).__name__}): client {client}'s state") from None
        return _state(saved)

    def __setitem__(self, client: int, state: ClientState) -> None:
        self.pending[int(client)] = ClientState.of(state)

    def __delitem__(self, client: int) -> None:
        if client not in self:
            raise KeyError(client)
        self.pending.pop(client, None)
        self.versions.pop(client, None)  # its file goes at the next prune

    def __contains__(self, client: object) -> bool:
        return client in self.pending or client in self.versions

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self.pending) | set(self.versions)))

    def __len__(self) -> int:
        return len(set(self.pending) | set(self.versions))

    def __repr__(self) -> str:
        return f"ClientStore({self.folder}, {len(self)} clients, {len(self.pending)} in memory)"

    # -- files ------------------------------------------------------------------------------------
    @property
    def resident(self) -> int:
        """How many clients' states are held in memory (the pending ones)."""
        return len(self.pending)

    def flush(self, version: int) -> None:
        """Write the pending states as of round ``version`` (atomically, each to its own file)
        and drop them from memory. The files they supersede stay until :meth:`prune`."""
        if self.pending:
            self.folder.mkdir(parents=True, exist_ok=True)
        for client, state in sorted(self.pending.items()):
            atomic_torch_save(self.path(client, version), _plain(state))
            self.versions[client] = version
        self.pending.clear()

    def reference(self) -> dict[int, int]:
        """What a checkpoint keeps of the store: each client's file by the round it was written
        in. Only after :meth:`flush`: a pending state has no file yet."""
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} client states are not written yet: flush first")
        return dict(self.versions)

    def prune(self) -> None:
        """Delete the files that :meth:`reference` does not name (superseded versions, a cut
        round's files, an earlier start's, temporary files of an interrupted write): call only
        once the checkpoint that names the current versions is written."""
        if not self.folder.is_dir():
            return
        kept = {self.path(i, v).name for i, v in self.versions.items()}
        for path in self.folder.iterdir():
            if path.name in kept or not path.is_file():
                continue
            if _FILE.fullmatch(path.name) or path.name.startswith("."):
                path.unlink(missing_ok=True)


def _plain(state: ClientState) -> dict[str, Any]:
    """A client state as plain tensors and numbers (``torch.load(weights_only=True)`` reads it).
    Tensors are saved as they are (views and strides kept), as a checkpoint pickled them."""
    return {
        "factors": {n: {"B": f.B, "A": f.A, "scale": f.scale} for n, f in state.factors.items()},
        "head": dict(state.head),
        "rank": state.rank,
    }


def _state(saved: Mapping[str, Any]) -> ClientState:
    factors = {n: LowRank(f["B"], f["A"], f["scale"]) for n, f in saved["factors"].items()}
    return ClientState(factors, dict(saved["head"]), int(saved["rank"]))
