"""Gauge sensitivity and exactness of every registered rule, on one shared fixture.

For each rule (default options, plus the exact settings of GLoRA and FLoRIST) and for
equal and for unequal client ranks, two numbers:
- gauge sensitivity: ||delta(regauged) - delta|| / ||delta||, where every client's
  (B_i, A_i) is replaced by (B_i G_i, G_i^-1 A_i) with a random well-conditioned G_i.
  The clients' updates are unchanged, so a rule that aggregates updates gives 0 (up to
  round-off). Where a rule's plan freezes a factor (FFA-LoRA's A, RoLoRA's factor of the
  round), clients cannot move independently; they share one G, the only gauge freedom
  the protocol leaves them.
- error: ||delta - exact|| / ||exact||, with exact = sum_i w_i s_i B_i A_i.
``delta`` is the state's total update (base merge included); for FedSA-LoRA it is the
global averaged model (mean B, mean A), not the clients' personalised ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glora.aggregation import RULES, get_rule
from glora.aggregation.base import FACTORS
from glora.lowrank import LowRank, random_gauge_matrix

EQUAL_RANKS = (4, 4, 4, 4)
UNEQUAL_RANKS = (2, 4, 8, 16)
WEIGHTS = (10.0, 30.0, 5.0, 55.0)
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class GaugeRow:
    """One rule on one rank setting; ``gauge_shift`` and ``error`` are None where the rule
    refuses the ranks (``note`` says why)."""

    rule: str
    ranks: tuple[int, ...]
    gauge_shift: float | None
    error: float | None
    note: str = ""


def fixture(ranks: tuple[int, ...], frozen: frozenset[str], d_out: int = 48, d_in: int = 32, seed: int = 0):
    """Generic client updates on a non-square layer, scale lora_alpha / r (PEFT), with every
    factor in ``frozen`` made identical across clients as the training loop would make it.
    Frozen factors need equal ranks; with unequal ranks they are left generic (such rules
    refuse unequal ranks before looking at the factors)."""
    g = torch.Generator().manual_seed(seed)
    ups = [
        LowRank(
            torch.randn(d_out, r, generator=g, dtype=torch.float64),
            torch.randn(r, d_in, generator=g, dtype=torch.float64),
            LORA_ALPHA / r,
        )
        for r in ranks
    ]
    if len(set(ranks)) == 1:
        B0, A0 = ups[0].B, ups[0].A
        ups = [LowRank(B0 if "B" in frozen else u.B, A0 if "A" in frozen else u.A, u.scale) for u in ups]
    return ups


def regauge(updates: list[LowRank], common: bool, seed: int = 1) -> list[LowRank]:
    """Each update in a random gauge; ``common``: one gauge for every client (equal ranks)."""
    g = torch.Generator().manual_seed(seed)
    if common:
        G = random_gauge_matrix(updates[0].rank, g)
        return [u.gauge(G) for u in updates]
    return [u.gauge(random_gauge_matrix(u.rank, g)) for u in updates]


def exact_mean(updates: list[LowRank], weights: tuple[float, ...]) -> Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return sum(wi * u.delta() for wi, u in zip(w.tolist(), updates, strict=True))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(
    name: str, ranks: tuple[int, ...], options: dict | None = None, label: str = "", note: str = "", seed: int = 0
) -> GaugeRow:
    """Gauge sensitivity and error of rule ``name`` built with ``options`` on the fixture."""
    rule = get_rule(name, **(options or {}))
    label = label or name
    if len(set(ranks)) > 1 and not rule.accepts_unequal_ranks:
        return GaugeRow(label, ranks, None, None, "refuses unequal ranks")
    frozen = FACTORS - rule.client_plan(1).train
    ups = fixture(ranks, frozen, seed=seed)
    delta = rule.aggregate(ups, WEIGHTS).delta()
    moved = rule.aggregate(regauge(ups, common=bool(frozen), seed=seed + 1), WEIGHTS).delta()
    if frozen:
        note = "; ".join(filter(None, (note, f"{'/'.join(sorted(frozen))} frozen and shared: one common gauge")))
    return GaugeRow(label, ranks, _rel(moved, delta), _rel(delta, exact_mean(ups, WEIGHTS)), note)


DEFAULT_NOTES = {
    "glora": "default R = largest client rank: the mean projected on the consensus subspace",
    "florist": "default: keeps 90% of the energy sum sig^2",
    "fedsa-lora": "delta() = the averaged model (mean B, mean A); clients keep their own B",
}


def variants(ranks: tuple[int, ...]) -> list[tuple[str, str, dict, str]]:
    """(label, rule, options, note): every registered rule with its defaults, plus the options
    of GLoRA and FLoRIST that make them exact (server rank covering every client's update).
    Pooled rules (the centralized reference) are left out: they aggregate one client."""
    out = [(name, name, {}, DEFAULT_NOTES.get(name, "")) for name in sorted(RULES) if not RULES[name].pooled]
    out.append(("glora, rank = sum r_i", "glora", {"rank": sum(ranks)}, ""))
    out.append(("florist, threshold = 1", "florist", {"threshold": 1.0}, ""))
    return out


def gauge_table(seed: int = 0) -> list[GaugeRow]:
    """Every variant on equal, then unequal ranks."""
    return [
        measure(name, ranks, options, label, note, seed)
        for ranks in (EQUAL_RANKS, UNEQUAL_RANKS)
        for label, name, options, note in variants(ranks)
    ]


def to_markdown(rows: list[GaugeRow]) -> str:
    """One line per rule: gauge sensitivity and error for equal and for unequal ranks."""

    def fmt(x: float | None) -> str:
        return "refuses" if x is None else f"{x:.1e}"

    by_rule: dict[str, dict[tuple[int, ...], GaugeRow]] = {}
    for r in rows:
        by_rule.setdefault(r.rule, {})[r.ranks] = r
    eq, uneq = "/".join(map(str, EQUAL_RANKS)), "/".join(map(str, UNEQUAL_RANKS))
    lines = [
        f"| rule | gauge sensitivity, ranks {eq} | error vs exact mean, {eq} "
        f"| gauge sensitivity, ranks {uneq} | error vs exact mean, {uneq} | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, cells in by_rule.items():
        e, u = cells[EQUAL_RANKS], cells[UNEQUAL_RANKS]
        note = "; ".join(dict.fromkeys(n for n in (e.note, u.note) if n))
        lines.append(
            f"| {name} | {fmt(e.gauge_shift)} | {fmt(e.error)} | {fmt(u.gauge_shift)} | {fmt(u.error)} | {note} |"
        )
    return "\n".join(lines)
