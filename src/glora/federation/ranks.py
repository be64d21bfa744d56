"""The clients' LoRA ranks of a run: one rank, a list assigned in turn, or a named distribution."""

from __future__ import annotations

# Named client-rank distributions: "skewed" is few high-rank clients, many low-rank ones.
RANK_DISTRIBUTIONS: dict[str, tuple[tuple[int, float], ...]] = {
    "uniform-2-16": ((2, 0.25), (4, 0.25), (8, 0.25), (16, 0.25)),
    "skewed": ((2, 0.4), (4, 0.3), (8, 0.2), (16, 0.1)),
}


def parse_ranks(spec: str, clients: int, seed: int = 0) -> list[int]:
    """'8' -> every client rank 8; '2,4,8,16' -> assigned in turn; a distribution name ->
    sampled with the seed. ValueError for zeros, negatives or unknown names."""
    spec = str(spec).strip()
    if spec in RANK_DISTRIBUTIONS:
        import numpy as np

        values, probs = zip(*RANK_DISTRIBUTIONS[spec], strict=True)
        rng = np.random.default_rng(seed + 7919)
        # Deterministic counts in proportion, then a seeded shuffle: every rank appears.
        counts = [max(1, round(p * clients)) for p in probs]
        while sum(counts) > clients:
            counts[counts.index(max(counts))] -= 1
        while sum(counts) < clients:
            counts[0] += 1
        ranks = [v for v, c in zip(values, counts, strict=True) for _ in range(c)]
        return [int(r) for r in rng.permutation(ranks)]
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--ranks {spec!r}: give one rank (8), a list assigned in turn (2,4,8,16), "
            f"or a distribution name ({', '.join(RANK_DISTRIBUTIONS)})"
        ) from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--ranks {spec!r}: every rank must be a positive integer")
    return [values[i % len(values)] for i in range(clients)]
