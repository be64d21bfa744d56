"""The measured work (one server round, the floor, the traffic it implies) and how it is
measured: time over warm rounds after a cold one, peak resident memory above a baseline."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from glora import LowRank
from glora.aggregation import LayerState, Rule, normalize_weights
from glora.experiments.bench.cases import Round


# -- the measured work ----------------------------------------------------------------------------
def server_round(rule: Rule, rnd: Round) -> dict[str, LayerState]:
    """Aggregate every layer, compute the merges once, read out every client's adapter."""
    states = rule.aggregate_layers(rnd.updates, rnd.weights)
    merges = [s.merge() for s in states.values()]
    for r, s in zip(rnd.ranks, rnd.scales, strict=True):
        adapter = {n: st.readout(r, s) for n, st in states.items()}
        del adapter  # sent, and dropped: the server holds one client's adapter at a time
    del merges
    return states


def floor_round(rnd: Round) -> None:
    """Read every client factor once: a weighted sum into zero-padded (d_out, r_max) and
    (r_max, d_in) accumulators, layer by layer."""
    w = normalize_weights(rnd.weights, len(rnd.ranks)).tolist()
    r_max = max(rnd.ranks)
    for ups in rnd.updates.values():
        B = torch.zeros(ups[0].d_out, r_max)
        A = torch.zeros(r_max, ups[0].d_in)
        for wi, u in zip(w, ups, strict=True):
            B[:, : u.rank].add_(u.B, alpha=wi)
            A[: u.rank].add_(u.A, alpha=wi)


def nbytes(x: LowRank | torch.Tensor | None, factors: frozenset[str]) -> int:
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(t.numel() * t.element_size() for f, t in (("B", x.B), ("A", x.A)) if f in factors)


def state_bytes(states: dict[str, LayerState]) -> int:
    """Bytes of the tensors the states hold (directly or in a LowRank): what the server keeps
    per layer until the round ends."""
    total = 0
    for st in states.values():
        for f in fields(st):
            v = getattr(st, f.name)
            total += nbytes(v, frozenset({"A", "B"})) if isinstance(v, torch.Tensor | LowRank) else 0
    return total


def traffic(rule: Rule, rnd: Round, states: dict[str, LayerState]) -> tuple[float, float]:
    """Mean bytes per client sent up and down in this round (see the module docstring)."""
    plan = rule.client_plan(1)
    both = frozenset({"A", "B"})
    up = [sum(nbytes(ups[i], plan.send) for ups in rnd.updates.values()) for i in range(len(rnd.ranks))]
    merged = sum(nbytes(s.merge(), both) for s in states.values())
    down = []
    for r, s in zip(rnd.ranks, rnd.scales, strict=True):
        total = merged
        for st in states.values():
            out = st.readout(r, s)
            fresh = st.merge() is not None and not bool(out.B.any())
            total += 0 if fresh else nbytes(out, plan.send - plan.personal)
        down.append(total)
    return statistics.mean(up), statistics.mean(down)


# -- measuring ------------------------------------------------------------------------------------
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


class PeakMemory:
    """Peak resident memory of this process above a baseline.

    Linux keeps the high-water mark of the resident set (VmHWM) and lets a process reset it
    (writing 5 to /proc/self/clear_refs): exact, and no sampling thread to miss a short
    peak. Before the baseline, freed heap memory is handed back (malloc_trim), so that a
    round cannot hide its allocations in memory an earlier round left resident."""

    def __init__(self) -> None:
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        gc.collect()
        if LIBC is not None:
            LIBC.malloc_trim(0)
        self.base = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return self._status("VmHWM") - self.base

    def now(self) -> int:
        return self._status("VmRSS") - self.base


def measure(
    fn: Callable[[], Any], slow_s: float, repeats: int, budget_s: float, on_cold: Callable[[], None] = lambda: None
) -> tuple[dict[str, Any], Any]:
    """Time and memory of ``fn``: one cold run (memory; and the time, if it took longer than
    ``slow_s``), then up to ``repeats`` warm runs, as many as fit in ``budget_s`` (at least
    one), whose median is the time. ``on_cold`` is called after the cold run. Returns
    (numbers, the last run's result)."""
    mem = PeakMemory()
    mem.start()
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    numbers: dict[str, Any] = {"peak_bytes": mem.peak(), "retained_bytes": mem.now(), "first_seconds": first}
    on_cold()
    times = [first]
    if first < slow_s and repeats > 0:
        times = []
        while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
            del out
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    numbers.update(seconds=statistics.median(times), runs=len(times), cold=times == [first])
    return numbers, out
