"""The worker process: it runs cases read from stdin, every rule on each, and reports each
step as a JSON line on stdout, so that the parent (``main``) can stop a round at its time
cap by killing the process. Started by the parent as
``python -m glora.experiments.bench.worker OPTIONS_JSON``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psutil
import torch

from glora import LowRank
from glora.aggregation import RULES, Rule
from glora.experiments.bench.cases import FLOOR, VARIANTS, Case, Round, build_rule, make_round, with_shared_A
from glora.experiments.bench.measure import floor_round, measure, nbytes, server_round, state_bytes, traffic


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
        received = sum(nbytes(u, frozenset({"A", "B"})) for ups in rnd.updates.values() for u in ups)
        return {"status": "measured", **numbers, "received_bytes": received}
    rule = build_rule(name)
    reason = skip_reason(rule)
    if reason:
        return {"status": "skipped", "note": reason}
    plan = rule.client_plan(1)
    if plan.send == frozenset({"B"}) and case.equal_ranks:  # unequal ranks: the rule's own error
        rnd = with_shared_A(rnd)
    received = sum(nbytes(u, plan.send) for ups in rnd.updates.values() for u in ups)
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


if __name__ == "__main__":
    serve(argparse.Namespace(**json.loads(sys.argv[1])))
