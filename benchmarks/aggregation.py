"""The aggregation benchmark, run from a source checkout into the checkout's results/bench/.
The benchmark is ``glora.experiments.bench`` (``glora bench`` runs the same); what it
measures and how: the docstring of src/glora/experiments/bench/__init__.py.

    .venv/bin/python benchmarks/aggregation.py            # the full benchmark, writes results/bench/
    .venv/bin/python benchmarks/aggregation.py --quick    # a small smoke run (seconds)
"""

from __future__ import annotations

import sys
from pathlib import Path

from glora.experiments.bench.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # The command recorded in aggregation.json and aggregation.md, spelled as this script is run.
    main(
        args,
        command=" ".join(["python benchmarks/aggregation.py", *args]),
        default_out=Path(__file__).resolve().parents[1] / "results" / "bench",
    )
