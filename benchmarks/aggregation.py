"""Server cost of every aggregation rule: time, peak memory and traffic of one round.

    .venv/bin/python benchmarks/aggregation.py            # the full benchmark, writes results/bench/
    .venv/bin/python benchmarks/aggregation.py --quick    # a small smoke run (seconds)
    glora bench [same options]                            # the same script

One round = the server aggregates every client's update of every adapted layer
(``rule.aggregate_layers``), computes what all clients merge into their base weights
(``state.merge()``, once), and reads out the adapter of each client
(``state.readout(rank, scale)`` for every layer). Each case runs in a fresh worker
process, which generates the clients' float32 factors once and runs every rule on them:

- time: the median of up to ``--repeats`` warm rounds (as many as fit in ``--budget``
  seconds, at least one) after a first, cold round; a rule whose cold round takes longer
  than ``--slow`` seconds is reported from that one round;
- memory: the peak resident memory of the process during the first round, above the
  resident memory just before it (inputs included in the baseline, freed heap memory
  handed back to the kernel first), read from the kernel's high-water mark;
- traffic: bytes per client, counted from the tensors: up, the factors the rule's client
  plan sends; down, what every client merges (FLoRA's stacked pair, FedEx-LoRA's dense
  residual, ...) plus the factors of its readout the plan exchanges, except a fresh
  seeded adapter (B = 0), which the client draws itself;
- the floor: a plain weighted sum of every client factor into a zero-padded
  accumulator, the least any server rule can do (read everything once).

A rule that needs equal ranks is run on unequal ones too, and its ValueError reported.
A whole model is first timed on one layer of each shape (within ``--sample-cap``
seconds); when the memory that predicts (the sampled peak plus every other layer's state,
counted from its tensors) is more than the machine has free, it is refused with the
numbers; when the time it predicts is more than ``--cap`` seconds, the round is reported
as per-layer time x layer count, marked extrapolated, and not run. A round still running
at its cap is stopped (the worker process is killed) and reported as a lower bound.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from glora import LowRank
from glora.aggregation import RULES, LayerState, Rule, get_rule, normalize_weights

ROOT = Path(__file__).resolve().parents[1]
LORA_ALPHA = 16.0  # scale = lora_alpha / r, as peft: clients of different ranks have different scales

# Rule variants measured beside the registered rules: (registered name, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"glora-f32": ("glora", {"dtype": torch.float32})}
FLOOR = "floor"


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One server round to measure.

    shapes: (module, d_out, d_in, layer count) per adapted module kind;
    ranks: client ranks, assigned to the clients in turn; group: which sweep the case
    belongs to ("d", "K" or "model").
    """

    name: str
    group: str
    shapes: tuple[tuple[str, int, int, int], ...]
    clients: int
    ranks: tuple[int, ...]
    seed: int = 0

    def client_ranks(self) -> list[int]:
        return [self.ranks[i % len(self.ranks)] for i in range(self.clients)]

    def layers(self) -> list[tuple[str, int, int]]:
        """(layer name, d_out, d_in) of every adapted layer."""
        return [(f"{m}.{j}", o, i) for m, o, i, count in self.shapes for j in range(count)]

    @property
    def n_layers(self) -> int:
        return sum(s[3] for s in self.shapes)

    def by_shape(self) -> dict[tuple[int, int], list[str]]:
        """Layer names per distinct (d_out, d_in)."""
        out: dict[tuple[int, int], list[str]] = {}
        for name, d_out, d_in in self.layers():
            out.setdefault((d_out, d_in), []).append(name)
        return out

    @property
    def equal_ranks(self) -> bool:
        return len(set(self.ranks)) == 1


EQUAL = (8,)
UNEQUAL = (4, 8, 16, 32, 64)  # the single-layer sweeps: ranks 4 to 64
UNEQUAL_MODEL = (4, 8, 16)  # whole models: ranks up to 16


def _rank_label(ranks: tuple[int, ...]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {min(ranks)}-{max(ranks)}"


def layer_case(d_out: int, d_in: int, clients: int, ranks: tuple[int, ...], group: str) -> Case:
    name = f"layer {d_out}x{d_in}, K={clients}, {_rank_label(ranks)}"
    return Case(name, group, (("layer", d_out, d_in, 1),), clients, ranks)


def model_case(model: str, shapes: tuple, clients: int, ranks: tuple[int, ...]) -> Case:
    return Case(f"{model}, K={clients}, {_rank_label(ranks)}", "model", shapes, clients, ranks)


ROBERTA_QV = (("query", 768, 768, 12), ("value", 768, 768, 12))
LLAMA7B_QV = (("q_proj", 4096, 4096, 32), ("v_proj", 4096, 4096, 32))
LLAMA7B_ALL = (
    ("q_proj", 4096, 4096, 32),
    ("k_proj", 4096, 4096, 32),
    ("v_proj", 4096, 4096, 32),
    ("o_proj", 4096, 4096, 32),
    ("gate_proj", 11008, 4096, 32),
    ("up_proj", 11008, 4096, 32),
    ("down_proj", 4096, 11008, 32),
)
HEADLINE = model_case("LLaMA-7B q/v", LLAMA7B_QV, 50, UNEQUAL_MODEL).name


def cases(quick: bool) -> list[Case]:
    """The benchmark grid: single layers against d (K = 50) and against K (d = 2048: at 4096
    FlexLoRA's dense SVD alone would eat the time budget), equal and unequal ranks, and three
    whole models. ``quick``: a miniature of the same grid."""
    out: list[Case] = []
    if quick:
        for ranks in (EQUAL, UNEQUAL):
            out += [layer_case(d, d, 10, ranks, "d") for d in (256, 512)]
            out += [layer_case(512, 512, k, ranks, "K") for k in (5, 20)]
        return [*out, model_case("tiny q/v", (("q", 256, 256, 4), ("v", 256, 256, 4)), 10, UNEQUAL_MODEL)]
    for ranks in (EQUAL, UNEQUAL):
        out += [layer_case(d, d, 50, ranks, "d") for d in (1024, 2048, 4096, 8192)]
        out.append(layer_case(4096, 11008, 50, ranks, "d"))
        out += [layer_case(2048, 2048, k, ranks, "K") for k in (10, 100)]
    # Whole models, kept to three so that the run stays within its 15 minutes: the query/value
    # models with unequal ranks (the heterogeneous setting GLoRA is for; the equal-rank rules
    # report their ValueError), all linear layers with equal ranks (every rule can run), at
    # K = 10 there: at K = 50 the clients' factors of its 224 layers alone are 4.6 GB.
    out.append(model_case("RoBERTa-base q/v", ROBERTA_QV, 50, UNEQUAL_MODEL))
    out.append(model_case("LLaMA-7B q/v", LLAMA7B_QV, 50, UNEQUAL_MODEL))
    out.append(model_case("LLaMA-7B all linear", LLAMA7B_ALL, 10, EQUAL))
    return out


# -- inputs ---------------------------------------------------------------------------------------
@dataclass
class Round:
    """The clients' uploads of one round: updates[layer][client], weights (example counts)."""

    updates: dict[str, list[LowRank]]
    weights: list[float]
    ranks: list[int]
    scales: list[float]

    def subset(self, names: list[str]) -> Round:
        return Round({n: self.updates[n] for n in names}, self.weights, self.ranks, self.scales)


def make_round(case: Case) -> Round:
    """Gaussian float32 factors: B at the scale of a trained LoRA B, A at a LoRA init's."""
    g = torch.Generator().manual_seed(case.seed)
    ranks = case.client_ranks()
    scales = [LORA_ALPHA / r for r in ranks]
    weights = torch.randint(100, 1000, (case.clients,), generator=g).double().tolist()
    updates = {
        name: [
            LowRank(
                torch.randn(d_out, r, generator=g).mul_(0.01),
                torch.randn(r, d_in, generator=g).mul_(d_in**-0.5),
                s,
            )
            for r, s in zip(ranks, scales, strict=True)
        ]
        for name, d_out, d_in in case.layers()
    }
    return Round(updates, weights, ranks, scales)


def with_shared_A(rnd: Round) -> Round:
    """The same round for a rule whose clients train B only: every client holds the same A
    (its own copy of it, as received)."""
    updates = {n: [LowRank(u.B, ups[0].A.clone(), u.scale) for u in ups] for n, ups in rnd.updates.items()}
    return Round(updates, rnd.weights, rnd.ranks, rnd.scales)


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


def _nbytes(x: LowRank | torch.Tensor | None, factors: frozenset[str]) -> int:
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
            total += _nbytes(v, frozenset({"A", "B"})) if isinstance(v, torch.Tensor | LowRank) else 0
    return total


def traffic(rule: Rule, rnd: Round, states: dict[str, LayerState]) -> tuple[float, float]:
    """Mean bytes per client sent up and down in this round (see the module docstring)."""
    plan = rule.client_plan(1)
    both = frozenset({"A", "B"})
    up = [sum(_nbytes(ups[i], plan.send) for ups in rnd.updates.values()) for i in range(len(rnd.ranks))]
    merged = sum(_nbytes(s.merge(), both) for s in states.values())
    down = []
    for r, s in zip(rnd.ranks, rnd.scales, strict=True):
        total = merged
        for st in states.values():
            out = st.readout(r, s)
            fresh = st.merge() is not None and not bool(out.B.any())
            total += 0 if fresh else _nbytes(out, plan.send - plan.personal)
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


# -- the worker: one case, every rule -------------------------------------------------------------
def build_rule(name: str) -> Rule:
    base, options = VARIANTS.get(name, (name, {}))
    return get_rule(base, **options)


def rule_names() -> list[str]:
    """Every registered rule, with the variants after their base rule."""
    out = []
    for name in RULES:
        out.append(name)
        out += [v for v, (base, _) in VARIANTS.items() if base == name]
    return out


def skip_reason(rule: Rule) -> str | None:
    """Why a registered rule has no server round to measure, or None."""
    if rule.pooled:
        return "reference point (pools all data into one client): no federated server round"
    if not rule.client_plan(1).send:
        return "reference point (clients send nothing): no server round"
    return None


def run_rule(name: str, case: Case, rnd: Round, args: argparse.Namespace) -> dict[str, Any]:
    """One rule on one case, as a result record."""
    if name == FLOOR:
        numbers, _ = measure(lambda: floor_round(rnd), args.slow, args.repeats, args.budget)
        received = sum(_nbytes(u, frozenset({"A", "B"})) for ups in rnd.updates.values() for u in ups)
        return {"status": "measured", **numbers, "received_bytes": received}
    rule = build_rule(name)
    reason = skip_reason(rule)
    if reason:
        return {"status": "skipped", "note": reason}
    plan = rule.client_plan(1)
    if plan.send == frozenset({"B"}) and case.equal_ranks:  # unequal ranks: the rule's own error
        rnd = with_shared_A(rnd)
    received = sum(_nbytes(u, plan.send) for ups in rnd.updates.values() for u in ups)
    try:
        if case.group == "model":
            result = _run_model(rule, case, rnd, args)
        else:
            numbers, states = measure(lambda: server_round(rule, rnd), args.slow, args.repeats, args.budget, _cold)
            up, down = traffic(rule, rnd, states)
            result = {"status": "measured", **numbers, "up_bytes": up, "down_bytes": down}
    except ValueError as e:
        return {"status": "refused", "note": f"ValueError: {_first_sentence(e)}"}
    except (RuntimeError, MemoryError) as e:  # an allocation the memory limit refuses
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return {"status": "refused", "note": f"out of memory: {_first_sentence(e)}"}
    return {**result, "received_bytes": received}


def _first_sentence(e: BaseException) -> str:
    """The message's first clause (before "; " or a newline), at most 120 characters."""
    text = str(e).strip().splitlines()[0].split("; ")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _run_model(rule: Rule, case: Case, rnd: Round, args: argparse.Namespace) -> dict[str, Any]:
    """A whole model: time one layer of each shape first; run the whole round only if that
    predicts it within the time cap and the free memory, else extrapolate or refuse."""
    per_shape = []  # (layer count, seconds, peak, state bytes, up, down) for one layer of each shape
    for names in case.by_shape().values():
        sample = rnd.subset(names[:1])
        numbers, states = measure(lambda sample=sample: server_round(rule, sample), float("inf"), 0, 0.0)
        up, down = traffic(rule, sample, states)
        held = state_bytes(states)
        per_shape.append((len(names), numbers["seconds"], numbers["peak_bytes"], held, up, down))
        del states
    seconds = sum(c * t for c, t, *_ in per_shape)
    # Every layer's state (its tensors) stays alive until the round ends; the layer being
    # computed adds its own peak.
    peak = max(p for _, _, p, _, _, _ in per_shape) + sum((c - 1) * h for c, _, _, h, _, _ in per_shape)
    up = sum(c * u for c, *_, u, _ in per_shape)
    down = sum(c * d for c, *_, d in per_shape)
    free = psutil.virtual_memory().available
    sampled = f"one layer of each shape timed ({len(per_shape)} of {case.n_layers}), x layer count"
    if peak > 0.8 * free:
        note = f"refused: needs ~{peak / 2**30:.1f} GiB ({sampled}), {free / 2**30:.1f} GiB free"
        return {
            "status": "refused",
            "seconds": seconds,
            "peak_bytes": peak,
            "up_bytes": up,
            "down_bytes": down,
            "note": note,
        }
    if seconds > args.cap:
        note = f"extrapolated: {sampled} (predicted > {args.cap:g} s cap)"
        return {
            "status": "extrapolated",
            "seconds": seconds,
            "runs": 1,
            "peak_bytes": peak,
            "up_bytes": up,
            "down_bytes": down,
            "note": note,
        }
    _emit({"event": "full"})
    numbers, states = measure(lambda: server_round(rule, rnd), args.slow, args.repeats, args.budget, _cold)
    up, down = traffic(rule, rnd, states)
    return {"status": "measured", **numbers, "up_bytes": up, "down_bytes": down}


def _limit_memory() -> None:
    """Cap this worker's address space at what it uses now plus the memory free now, so that
    a dense rule that cannot fit fails its allocation (and is reported) instead of pushing
    the machine, which others share, into the kernel's out-of-memory killer."""
    import resource

    used = psutil.Process().memory_info().vms
    limit = used + psutil.virtual_memory().available
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(args: argparse.Namespace) -> None:
    """Run cases read from stdin (one JSON line each: the case and its rules) and print one
    JSON line per event (see ``Worker``); one process serves case after case until the
    parent stops it at a time cap."""
    torch.set_num_threads(args.threads)
    _limit_memory()
    _warm_libraries()
    for line in sys.stdin:
        task = json.loads(line)
        case = Case(
            **{
                **task["case"],
                "shapes": tuple(map(tuple, task["case"]["shapes"])),
                "ranks": tuple(task["case"]["ranks"]),
            }
        )
        rnd = make_round(case)
        for name in task["rules"]:
            _emit({"event": "start", "rule": name})
            _emit({"event": "result", "rule": name, **run_rule(name, case, rnd, args)})
        del rnd
        _emit({"event": "done"})


def _warm_libraries() -> None:
    """One tiny round of GLoRA and FlexLoRA before any measurement: the first call of each
    LAPACK routine allocates its workspace and thread buffers once per process, which is not
    the cost of a round (and would dominate the memory of the small cases)."""
    g = torch.Generator().manual_seed(1)
    tiny = Round(
        {"w": [LowRank(torch.randn(24, r, generator=g), torch.randn(r, 16, generator=g), 1.0) for r in (2, 3)]},
        [1.0, 2.0],
        [2, 3],
        [1.0, 1.0],
    )
    for name in ("glora", "glora-f32", "flexlora"):
        if name in RULES or name in VARIANTS:
            server_round(build_rule(name), tiny)


def _cold() -> None:
    _emit({"event": "cold"})


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# -- the parent: cases in workers, time caps, output ----------------------------------------------
class Worker:
    """A worker process and its event stream (JSON lines on its stdout)."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(_worker_args(args))]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=worker_env()
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc, self.lines), daemon=True).start()

    def send(self, case: Case, rules: list[str]) -> None:
        self.proc.stdin.write(json.dumps({"case": asdict(case), "rules": rules}) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float | None) -> dict[str, Any]:
        """The next event; queue.Empty after ``timeout`` seconds."""
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError(f"a benchmark worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _worker_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in ("threads", "cap", "slow", "repeats", "budget")}


def run_case(
    case: Case, rules: list[str], args: argparse.Namespace, worker: Worker | None, log: Callable[[str], None]
) -> tuple[list[dict], Worker]:
    """Every rule on ``case``; a rule past its time cap gets the worker killed and the remaining
    rules a fresh one. Returns the results and the worker for the next case."""
    results: list[dict] = []
    pending = list(rules)
    while pending:
        worker = worker or Worker(args)
        worker.send(case, pending)
        current, phase, started, deadline = None, "", time.perf_counter(), None
        while True:
            wait = None if deadline is None else max(0.1, deadline - time.perf_counter())
            try:
                record = worker.next(wait)
            except queue.Empty:
                worker.kill()
                worker = None
                results.append({"rule": current, "status": "time cap", **_stopped(case, phase, started)})
                log(f"  {_describe(results[-1])}")
                pending.remove(current)
                break
            event, now = record.pop("event"), time.perf_counter()
            if event == "start":  # a whole model first times one layer of each shape
                current, started = record["rule"], now
                phase = "sample" if case.group == "model" else "cold"
                deadline = now + (args.sample_cap if case.group == "model" else args.cap)
            elif event == "full":  # the whole model, predicted to take at most the cap
                phase, started, deadline = "cold", now, now + 2 * args.cap
            elif event == "cold":  # warm rounds, within the budget, and the traffic count
                phase, deadline = "warm", now + args.budget + args.cap + 10
            elif event == "result":
                results.append(record)
                pending.remove(record["rule"])
                current, deadline = None, None
                log(f"  {_describe(record)}")
            elif event == "done":
                break
    return results, worker


def _stopped(case: Case, phase: str, started: float) -> dict[str, Any]:
    """The record of a rule stopped at the time cap in ``phase``, with a lower bound of its time."""
    spent = time.perf_counter() - started
    if phase == "sample":
        # The layers of one shape cost alike, so the model takes at least
        # (fewest layers of a shape) x (the time its sample layers did not finish in).
        fewest = min(len(v) for v in case.by_shape().values())
        note = (
            f"stopped at the time cap: one layer of each shape did not finish within {spent:.3g} s; "
            f"lower bound {fewest} x {spent:.3g} s"
        )
        return {"seconds": fewest * spent, "note": note}
    what = "its warm rounds" if phase == "warm" else "one round"
    return {"seconds": spent, "note": f"stopped at the time cap: {what} did not finish within {spent:.3g} s"}


def worker_env() -> dict[str, str]:
    """The workers' environment: OpenMP threads that sleep while they wait (unless set
    otherwise). On a machine whose cores other jobs share, spinning threads wait for a
    descheduled partner at every parallel region, which made small factorisations up to
    100x slower in our runs; passive waiting costs a fraction of that on an idle machine."""
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        if line.startswith("{"):
            lines.put(line)
    lines.put(None)


def _describe(r: dict) -> str:
    if r.get("seconds") is None:
        return f"{r['rule']:<12} {r['status']}: {r.get('note', '')}"
    mem = f"{r['peak_bytes'] / 2**20:9.1f} MiB" if r.get("peak_bytes") is not None else ""
    return f"{r['rule']:<12} {r['seconds']:9.4f} s {mem}  {r['status']} {r.get('note', '')}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    paths = [
        "src/glora/aggregation",
        "src/glora/lowrank.py",
        "benchmarks/aggregation.py",
        "benchmarks/aggregation_report.py",
    ]
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--", *paths) else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a miniature grid, for a smoke test")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--cap", type=float, default=15.0, help="time cap of one round, seconds")
    parser.add_argument(
        "--sample-cap", type=float, default=80.0, help="time cap of a whole model's one-layer-per-shape timing"
    )
    parser.add_argument("--slow", type=float, default=15.0, help="a cold round longer than this is not repeated")
    parser.add_argument("--repeats", type=int, default=3, help="most warm rounds after the cold one")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of warm rounds per rule and case")
    parser.add_argument("--rules", default="", help="comma-separated rules (default: every registered rule)")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these ('|'-separated)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench", help="output folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve(argparse.Namespace(**json.loads(args.worker)))
        return
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()] or rule_names()
    unknown = [r for r in rules if r not in RULES and r not in VARIANTS]
    if unknown:
        parser.error(f"unknown rules {unknown}; known: {', '.join(rule_names())}")
    grid = cases(args.quick)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split("|")]
        grid = [c for c in grid if any(w in c.name for w in wanted)]
    from aggregation_report import write_report

    command = "python benchmarks/aggregation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "commit": git_commit(),
        "threads": args.threads,
        "omp_wait_policy": worker_env()["OMP_WAIT_POLICY"],
        "cap_s": args.cap,
        "sample_cap_s": args.sample_cap,
        "slow_s": args.slow,
        "repeats": args.repeats,
        "budget_s": args.budget,
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    t0 = time.perf_counter()
    results, worker = [], None
    for i, case in enumerate(grid, 1):
        print(f"[{i}/{len(grid)}] {case.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        done, worker = run_case(case, [FLOOR, *rules], args, worker, lambda s: print(s, flush=True))
        results += [{"case": case.name, "group": case.group, **asdict(case), **r} for r in done]
    if worker is not None:
        worker.close()
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    paths = write_report({"meta": meta, "results": results}, args.out, HEADLINE)
    print(f"done in {meta['total_seconds']:.0f} s: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
