"""Server cost of every aggregation rule: time, peak memory and traffic of one round.

    glora bench                  # the full benchmark, writes results/bench/ (of the current folder)
    glora bench --quick          # a small smoke run (seconds)
    glora bench --help           # every option
    .venv/bin/python benchmarks/aggregation.py [options]   # the same, into the checkout's results/bench/

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

Modules: ``cases`` (the rounds measured and the rules), ``measure`` (one round, its traffic,
its time and memory), ``worker`` (the process that runs cases), ``main`` (the parent: cases
in workers under time caps, then the output) and ``report`` (aggregation.md and the plots,
from the raw numbers).
"""
