"""Replay the server on recorded client updates (``glora run --record-updates``).

Every candidate server step (a rule, or a GLoRA variant) aggregates the same recorded
clients' updates with the same weights, so candidates are compared on identical inputs,
and many seeds cost one aggregation and one evaluation each, not a training run. Measured
per (run, round, candidate) (results/replay/PREREGISTRATION.md): the distance of the server's
total update to the exact weighted mean, the global model's evaluation loss and metric, the
model a client receives at its rank, and the server's cost.

Only rules whose clients train and send both factors are replayed (the recorded clients did):
a rule whose client plan differs (FFA-LoRA, RoLoRA, FedSA-LoRA) would not be its protocol.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glora.aggregation import ClientPlan, LayerState, average_params, get_rule
from glora.data.metrics import compute_metrics
from glora.experiments.statistics import Stat
from glora.experiments.sweep_results import load_results
from glora.federation.client import adapted_model
from glora.federation.config import RunConfig
from glora.federation.results import RunStore
from glora.lowrank import LowRank
from glora.tasks import build_task


@dataclass(frozen=True)
class Candidate:
    """A server step to replay: a rule with options computed from the round's client ranks.

    readout_rank: evaluate the state's readout at this rank (from the client ranks) as the
    server's update instead of its full ``delta()`` (a reference: the mean's best rank-R
    approximation is FlexLoRA's readout at R).
    """

    label: str
    rule: str
    options: Callable[[list[int]], dict[str, Any]] = lambda ranks: {}
    readout_rank: Callable[[list[int]], int] | None = None


# The pre-registered candidates (results/replay/PREREGISTRATION.md): GLoRA's variants, the
# top-R reference and the baselines whose clients train and send B and A.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("glora R=max", "glora", lambda r: {"rank": "max"}),
    Candidate("glora R=2max", "glora", lambda r: {"rank": 2 * max(r)}),
    Candidate("glora R=sum<=64", "glora", lambda r: {"rank": min(sum(r), 64)}),
    Candidate("glora thr0.25,R<=2max", "glora", lambda r: {"rank": 2 * max(r), "threshold": 0.25}),
    Candidate("glora energy,R=max", "glora", lambda r: {"rank": "max", "consensus": "energy"}),
    Candidate("top-R of mean", "flexlora", readout_rank=max),
    Candidate("fedit", "fedit"),
    Candidate("flora", "flora"),
    Candidate("flexlora", "flexlora"),
    Candidate("hetlora", "hetlora", lambda r: {"data_weighted": False}),  # the norm-only rule the replays report
    Candidate("fedex-lora", "fedex-lora"),
    Candidate("florist", "florist"),
)


def exact_mean(updates: Mapping[str, Sequence[LowRank]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Dense weighted mean of each layer's client updates, float64 (d_out, d_in) per layer."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return {n: sum(float(wi) * u.delta().double() for wi, u in zip(w, ups, strict=True)) for n, ups in updates.items()}


def relative_distance(deltas: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> float:
    """sqrt(sum_l ||D_l - M_l||^2) / sqrt(sum_l ||M_l||^2) over the layers."""
    num = sum(float((deltas[n].double() - m).pow(2).sum()) for n, m in mean.items())
    den = sum(float(m.pow(2).sum()) for m in mean.values())
    return (num / den) ** 0.5 if den > 0 else 0.0


def state_floats(state: LayerState) -> int:
    """Numbers the server keeps for a layer: every tensor held by the state (and its factors)."""
    total = 0
    for f in dataclasses.fields(state):  # type: ignore[arg-type]
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            total += value.numel()
        elif isinstance(value, LowRank):
            total += value.B.numel() + value.A.numel()
    return total


def recorded_updates(record: Mapping[str, Any]) -> dict[str, list[LowRank]]:
    """The per-layer client updates of one recorded round (see simulation.update_record)."""
    return {n: [LowRank(B, A, float(s)) for B, A, s in per_client] for n, per_client in record["factors"].items()}


def replayable(candidate: Candidate, ranks: list[int]) -> bool:
    """Whether a candidate can aggregate these clients: its rule accepts their ranks, and its
    clients train and send both factors as the recorded clients did."""
    rule = get_rule(candidate.rule, **candidate.options(ranks))
    return rule.client_plan(1) == ClientPlan() and (rule.accepts_unequal_ranks or len(set(ranks)) == 1)


class Replay:
    """One recorded run, its task and model loaded once, replayed round by round."""

    def __init__(self, folder: Path, max_eval_examples: int | None = None, threads: int = 1) -> None:
        self.store = RunStore(folder)
        saved = self.store.config()
        if saved is None:
            raise ValueError(f"{folder} holds no run (no config.json)")
        if not self.store.recorded_rounds():
            raise ValueError(f"{folder} recorded no client updates: run it with --record-updates")
        torch.set_num_threads(threads)
        self.cfg = RunConfig.from_saved(saved).replace(threads=threads, max_eval_examples=max_eval_examples)
        self.task = build_task(self.cfg)
        self.ranks = self.cfg.client_ranks()
        self.model = adapted_model(self.task, self.cfg, self.ranks)
        self._scores: dict[tuple, dict[str, float]] = {}

    def evaluate(self, deltas: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Loss and metrics of base + ``deltas`` with ``head``; identical updates are scored once."""
        # Rules that reach the same update by other arithmetic (FLoRA's stack, FlexLoRA's SVD)
        # differ by round-off only: nine significant digits tell real differences apart.
        key = tuple(
            (n, f"{float(d.double().sum()):.9g}", f"{float(d.double().norm()):.9g}") for n, d in sorted(deltas.items())
        )
        if key not in self._scores:
            with self.model.dense_update(deltas, self.ranks[0], head) as m:
                logits = self.task.eval_logits(m)
            labels = self.task.eval.labels
            if logits.shape[1] == 1:
                loss = float(torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float()))
                preds = logits.squeeze(-1)
            else:
                loss = float(torch.nn.functional.cross_entropy(logits, labels))
                preds = logits.argmax(-1)
            self._scores[key] = {"loss": loss, **compute_metrics(self.task.name, preds.numpy(), labels.numpy())}
        return self._scores[key]

    def round(self, t: int, candidates: Sequence[Candidate]) -> Iterator[dict[str, Any]]:
        """One row per replayable candidate for recorded round ``t``."""
        record = self.store.load_updates(t)
        updates = recorded_updates(record)
        weights = [float(w) for w in record["weights"]]
        ranks = [f.rank for f in next(iter(updates.values()))]
        offsets = record["base_offsets"]
        shapes = self.model.layer_shapes()
        self.model.set_base_offsets(offsets or {n: torch.zeros(shape) for n, shape in shapes.items()})
        self._scores = {}  # scores hold for this round's base and head only
        head = average_params(record["heads"], weights)
        mean = exact_mean(updates, weights)
        for c in candidates:
            if not replayable(c, ranks):
                continue
            rule = get_rule(c.rule, **c.options(ranks))
            started = time.perf_counter()
            states = rule.aggregate_layers(updates, weights)
            seconds = time.perf_counter() - started
            total = self._received(states, c.readout_rank(ranks)) if c.readout_rank else self._total(states)
            row = {
                "round": t,
                "candidate": c.label,
                "dist": relative_distance(total, mean),
                "server_seconds": seconds,
                "state_floats": sum(state_floats(s) for s in states.values()),
                **self.evaluate(total, head),
            }
            received = {r: self._received(states, r) for r in sorted(set(ranks))}
            row["received_dist"] = float(np.mean([relative_distance(d, mean) for d in received.values()]))
            if len(received) == 1:
                scores = self.evaluate(next(iter(received.values())), head)
                row.update({f"received_{k}": v for k, v in scores.items()})
            yield row

    def _total(self, states: Mapping[str, LayerState]) -> dict[str, torch.Tensor]:
        return {n: s.delta().double() for n, s in states.items()}

    def _received(self, states: Mapping[str, LayerState], rank: int) -> dict[str, torch.Tensor]:
        """What a client of ``rank`` holds after the round: the merge plus its readout."""
        scale = self.model.settings.scale(rank)
        out = {}
        for n, s in states.items():
            merged = s.merged_delta()
            d = s.readout(rank, scale).delta().double()
            out[n] = d if merged is None else d + merged.double()
        return out


def replay_sweep(
    results_dir: Path,
    out: Path,
    rounds: Sequence[int],
    candidates: Sequence[Candidate] = CANDIDATES,
    max_eval_examples: int | None = None,
    threads: int = 1,
    settings: Sequence[str] | None = None,
) -> int:
    """Replay ``rounds`` of every finished run of a sweep folder (of ``settings`` only, if
    given; its runs recorded their updates) into the JSON-lines file ``out``, one row per
    (run, round, candidate) labelled with the run's setting and seed. Rows are appended and a run already in ``out`` is
    skipped, so an interrupted replay continues; the run folders are only read. Returns the
    number of rows written."""
    done = set()
    if out.exists():
        done = {json.loads(line)["run"] for line in out.read_text().splitlines() if line.strip()}
    written = 0
    for run in load_results(results_dir).finished():
        if run.identity in done or (settings and run.labels[0]["setting"] not in settings):
            continue
        replay = Replay(Path(results_dir) / run.identity, max_eval_examples, threads)
        missing = sorted(set(rounds) - set(replay.store.recorded_rounds()))
        if missing:
            raise ValueError(
                f"run {run.identity} did not record rounds {missing}: it has {replay.store.recorded_rounds()}"
            )
        label = run.labels[0]
        rows = [
            {"run": run.identity, "setting": label["setting"], "seed": replay.cfg.seed, **row}
            for t in rounds
            for row in replay.round(t, candidates)
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:  # one run's rows at once: an interrupted replay never leaves half a run
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        written += len(rows)
    return written


# The replay report: per setting, each candidate's mean over seeds of its per-seed mean over
# the replayed rounds; then the pre-registered paired comparison of GLoRA's variants.
REFERENCE = "glora R=max"
VARIANTS = tuple(c.label for c in CANDIDATES if c.rule == "glora")
COLUMNS = (
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "acc", "{:.4f}"),
    ("received_loss", "received loss", "{:.4f}"),
    ("received_accuracy", "received acc", "{:.4f}"),
    ("dist", "dist to mean", "{:.4f}"),
    ("received_dist", "received dist", "{:.4f}"),
    ("server_seconds", "server s", "{:.3f}"),
    ("state_floats", "state floats", "{:,.0f}"),
)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def per_seed(rows: Sequence[Mapping[str, Any]], key: str) -> dict[tuple[str, str, int], float]:
    """(setting, candidate, seed) -> the mean of ``key`` over the replayed rounds."""
    values: dict[tuple[str, str, int], list[float]] = {}
    for r in rows:
        if key in r:
            values.setdefault((r["setting"], r["candidate"], r["seed"]), []).append(float(r[key]))
    return {k: float(np.mean(v)) for k, v in values.items()}


def paired(
    rows: Sequence[Mapping[str, Any]], key: str, candidate: str, other: str, setting: str | None = None
) -> Stat | None:
    """``candidate`` minus ``other`` in ``key`` over the (setting, seed) pairs both have (one
    setting, or all)."""
    v = per_seed(rows, key)
    pairs = sorted((s, seed) for s, c, seed in v if c == candidate and (setting is None or s == setting))
    diffs = [v[(s, candidate, seed)] - v[(s, other, seed)] for s, seed in pairs if (s, other, seed) in v]
    return Stat.of(diffs) if diffs else None


def verdict(stat: Stat | None, lower_is_better: bool = True) -> str:
    """The paired difference in words: better, worse, or a tie (interval holding 0)."""
    if stat is None or stat.interval() is None:
        return "n/a"
    lo, hi = stat.interval()
    if lo <= 0 <= hi:
        return "tie"
    return "better" if (hi < 0) == lower_is_better else "worse"


def choose_default(rows: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, Stat | None]]:
    """The pre-registered rule (PREREGISTRATION.md, step 3): the GLoRA variant whose held-out
    loss is below the current default's with a paired 95% interval entirely below 0 (the
    lowest mean difference among such), else the current default."""
    diffs = {v: paired(rows, "loss", v, REFERENCE) for v in VARIANTS if v != REFERENCE}
    below = {v: s for v, s in diffs.items() if s is not None and s.interval() is not None and s.interval()[1] < 0}
    return (min(below, key=lambda v: below[v].mean) if below else REFERENCE), diffs


def _ci(stat: Stat | None, fmt: str = "{:+.4f}") -> str:
    if stat is None or stat.interval() is None:
        return "n/a"
    lo, hi = stat.interval()
    return f"{fmt.format(stat.mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def report_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Tables per setting (means over seeds) and the paired comparisons against the default."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    candidates = [c.label for c in CANDIDATES if any(r["candidate"] == c.label for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    rounds = sorted({r["round"] for r in rows})
    out = [
        f"# {title}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; replayed rounds {', '.join(map(str, rounds))}; each value is the mean "
        "over seeds of the seed's mean over those rounds. `paired vs default`: the candidate's held-out loss minus "
        f"`{REFERENCE}`'s, mean and paired 95% t-interval over seeds; an interval holding 0 is a tie.",
    ]
    for setting in settings:
        means = {k: per_seed([r for r in rows if r["setting"] == setting], k) for k, _, _ in COLUMNS}
        out += [
            "",
            f"## {setting}",
            "",
            "| candidate | " + " | ".join(h for _, h, _ in COLUMNS) + " | paired vs default |",
        ]
        out.append("|---" * (len(COLUMNS) + 2) + "|")
        for c in candidates:
            cells = []
            for key, _, fmt in COLUMNS:
                vals = [v for (s, cand, _), v in means[key].items() if cand == c]
                cells.append(fmt.format(float(np.mean(vals))) if vals else "")
            if not any(cells):
                continue
            diff = paired(rows, "loss", c, REFERENCE, setting) if c != REFERENCE else None
            tag = f"{_ci(diff)} ({verdict(diff)})" if diff is not None else ""
            out.append(f"| {c} | " + " | ".join(cells) + f" | {tag} |")
    chosen, diffs = choose_default(rows)
    out += [
        "",
        "## The pre-registered comparison (all settings pooled)",
        "",
        "| variant | loss minus default, mean [95% CI] | verdict | accuracy minus default | verdict |",
        "|---|---|---|---|---|",
    ]
    for v, stat in diffs.items():
        acc = paired(rows, "accuracy", v, REFERENCE)
        out.append(f"| {v} | {_ci(stat)} | {verdict(stat)} | {_ci(acc)} | {verdict(acc, lower_is_better=False)} |")
    out += ["", f"Chosen by the rule: **{chosen}**" + (" (the current default)" if chosen == REFERENCE else "") + "."]
    return "\n".join(out) + "\n"
