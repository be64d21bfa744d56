"""The benchmark's grid: the server rounds measured (single layers against d and K, whole
models), the rules measured on each, and the clients' uploads of a round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glora import LowRank
from glora.aggregation import RULES, Rule, get_rule

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


# -- rules ----------------------------------------------------------------------------------------
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
