"""The benchmark's parent process: each case in a worker process under its time caps, then
the raw numbers and the report. ``glora bench`` and ``benchmarks/aggregation.py`` call
:func:`main` with the command line that invoked them, which the output records."""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

import glora
from glora.aggregation import RULES
from glora.experiments import bench
from glora.experiments.bench.cases import FLOOR, HEADLINE, VARIANTS, Case, cases, rule_names
from glora.experiments.bench.report import write_report


class Worker:
    """A worker process and its event stream (JSON lines on its stdout)."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "glora.experiments.bench.worker", json.dumps(_worker_args(args))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env())
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
    """The short commit of the checkout the package runs from, marked where the benchmark's
    code has uncommitted changes; "unknown" outside a git checkout (an installed package)."""
    root = Path(glora.__file__).resolve().parents[2]

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    paths = [
        "src/glora/aggregation",
        "src/glora/lowrank.py",
        "src/glora/experiments/bench",
        "benchmarks/aggregation.py",
    ]
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--", *paths) else "")


def main(argv: list[str], command: str, prog: str | None = None, default_out: Path = Path("results") / "bench") -> None:
    """Run the benchmark with command-line options ``argv``. ``command``: the command line that
    invoked it, as its caller spells it (recorded in the output); ``prog``: the name the
    usage line gives; ``default_out``: the output folder when ``--out`` is not given."""
    parser = argparse.ArgumentParser(prog=prog, description=bench.__doc__.splitlines()[0])
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
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default: {default_out})")
    args = parser.parse_args(argv)
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
    meta = {
        "command": command,
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
