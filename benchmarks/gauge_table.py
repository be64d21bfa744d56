"""Print, as markdown, every rule's gauge sensitivity and its error against the exact
weighted mean, for equal and unequal client ranks on one shared fixture.

    .venv/bin/python benchmarks/gauge_table.py > results/gauge_exactness.md
"""

from __future__ import annotations

import argparse

from glora.experiments.gauges import EQUAL_RANKS, LORA_ALPHA, UNEQUAL_RANKS, WEIGHTS, gauge_table, to_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the client updates (gauges: seed + 1)")
    seed = parser.parse_args().seed
    print("# Gauge sensitivity and exactness of the aggregation rules\n")
    print(f"Made by `.venv/bin/python benchmarks/gauge_table.py --seed {seed} > results/gauge_exactness.md`.\n")
    eq, uneq = "/".join(map(str, EQUAL_RANKS)), "/".join(map(str, UNEQUAL_RANKS))
    print(
        f"Fixture: 4 clients, one 48 x 32 layer, Gaussian factors, scale {LORA_ALPHA:g} / r, example-count\n"
        f"weights {'/'.join(f'{w:g}' for w in WEIGHTS)}; ranks {eq} (equal) and {uneq} (unequal). Every rule\n"
        "with its default options, plus the settings that make GLoRA and FLoRIST exact.\n\n"
        "Gauge sensitivity: relative change of the state's total update `delta()` (base merge included)\n"
        "when every client re-expresses its update in a random well-conditioned gauge (B G, G^-1 A);\n"
        "~1e-15 is round-off, i.e. invariant. Error: relative Frobenius distance of `delta()` from the\n"
        "exact weighted mean sum_i w_i s_i B_i A_i. Details: `src/glora/experiments/gauges.py`.\n"
    )
    print(to_markdown(gauge_table(seed)))


if __name__ == "__main__":
    main()
