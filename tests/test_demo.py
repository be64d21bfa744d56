"""`glora demo`'s claims hold on its own data: GLoRA ignores the clients' gauges and comes
close to the best rank-R approximation (the dense SVD); FedIT does neither."""

from __future__ import annotations

from glora.experiments.demo import run_demo


def test_demo_rows_show_gauge_invariance_and_fedit_failing_it():
    rows = {(r.name, r.ranks): r for r in run_demo(seed=0)}
    for ranks, rank in (("8 x 10", 8), ("2/4/8/16", 16)):
        glora, dense = rows[(f"glora, rank {rank}", ranks)], rows[(f"dense SVD, rank {rank}", ranks)]
        assert glora.gauge_shift < 1e-5
        assert dense.error <= glora.error < dense.error * 1.1
    fedit = rows[("fedit, rank 8", "8 x 10")]
    assert fedit.gauge_shift > 0.1
    assert fedit.error > 2 * rows[("glora, rank 8", "8 x 10")].error
