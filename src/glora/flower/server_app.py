"""The ServerApp: the round loop of ``glora run`` with Flower as the transport.

It asks the nodes for their partitions and ranks, then runs :class:`RuleStrategy` for the
configured rounds. After each round it evaluates, merges and stores exactly as the in-process
simulation does (:class:`~glora.federation.simulation.Federation`), so the run folder
(config.json, meta.json, metrics.jsonl, checkpoint.pt, summary.json, adapter/) is the same
format and ``glora report`` reads both. A Flower run cannot be resumed.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from glora.federation.simulation import Federation, check_config, eval_line
from glora.flower.config import from_run_config
from glora.flower.strategy import NodeClient, RuleStrategy, discover_nodes, log

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config, context.run_id)


def run_server(grid: Grid, run_config: dict, run_id: int) -> dict:
    """Run the federation over ``grid``; returns the summary written to the run folder."""
    cfg, options = from_run_config(run_config)
    check_config(cfg)
    found = discover_nodes(grid, cfg.clients, options.node_wait)
    ranks = [rank for _, rank in found.values()]
    if ranks != cfg.client_ranks():
        # Nodes declared their own ranks: the run's config records the ranks it ran with.
        cfg = cfg.replace(ranks=",".join(str(r) for r in ranks))
    folder = options.folder(cfg)
    fed = Federation(cfg, folder, progress=False)
    st = fed.begin(command=["flwr", "run", f"(run {run_id})"])
    log.info("glora: writing the run to %s", folder.resolve())
    # The pooled reference is one client (index 0, the largest rank) on partition 0's node.
    nodes = [NodeClient(found[i][0], i, r) for i, r in enumerate(fed.ranks)]
    strategy = RuleStrategy(
        cfg.rule,
        nodes,
        fed.init,
        st.head,
        fed.model.settings.scale,
        rule_options=cfg.rule_options,
        fraction=cfg.fraction,
        seed=cfg.seed,
        weighting=cfg.weighting,
        state=st,
    )

    def end_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = strategy.last_record
        if record is None:
            if server_round == cfg.rounds and st.layers:
                fed.export(st)  # the last round failed: export the state it kept
            return None
        fed.end_round(st, server_round, record, strategy.round_started)
        if "eval" not in record:
            return None
        log.info("glora: %s", eval_line(server_round, record, fed.task.main_metric))
        return MetricRecord({k: float(v) for k, v in record["eval"].items()})

    strategy.start(
        grid, ArrayRecord(dict(st.head)), num_rounds=cfg.rounds, timeout=options.round_timeout, evaluate_fn=end_round
    )
    if st.layers is None:
        raise ValueError("no round had a usable reply from any node: nothing to write (see the logged reasons)")
    summary = fed.finish(st)
    log.info("glora: finished; summary in %s", fed.store.path("summary.json").resolve())
    return summary
