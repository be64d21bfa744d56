"""The ServerApp: the round loop of ``glora run`` with Flower as the transport.

It asks the nodes for their partitions and ranks, then runs :class:`RuleStrategy` for the
configured rounds. After each round it evaluates, merges and stores exactly as the in-process
simulation does (:class:`~glora.federation.simulation.Federation`), so the run folder
(config.json, meta.json, metrics.jsonl, checkpoint.pt, summary.json, adapter/) is the same
format and ``glora report`` reads both: the run folder's lock, the trackers (``report-to``) and
``record-updates`` work as in ``glora run``, and ``-c resume=true`` continues a run folder
from its last checkpoint (Flower counts the remaining rounds from 1; the run folder keeps the
run's own round numbers).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from glora.aggregation import Rule
from glora.federation.checks import check_config
from glora.federation.engine import ClientUpdate, ServerState, update_record
from glora.federation.simulation import Federation, eval_line
from glora.flower.config import from_run_config
from glora.flower.strategy import NodeClient, RuleStrategy, discover_nodes, log

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config, context.run_id)


def keeps_client_state(rule: Rule) -> bool:
    """Whether a node keeps state of its own between rounds: personal factors, an unshared
    head, or the rank it pruned itself to."""
    return rule.prunes or any(p.personal or not p.share_head for p in (rule.client_plan(t) for t in (1, 2)))


def run_server(grid: Grid, run_config: dict, run_id: int) -> dict:
    """Run the federation over ``grid``; returns the summary written to the run folder."""
    cfg, options = from_run_config(run_config)
    rule = check_config(cfg)
    if options.resume and keeps_client_state(rule):
        # The nodes' own factors and heads live in their context.state, which a new run starts empty.
        raise ValueError(
            f"rule {cfg.rule!r} keeps state on the nodes (their own factors or head), which a resumed Flower run "
            "has lost: run it again from round 1 (another out), or resume it in-process with glora run --resume"
        )
    found = discover_nodes(grid, cfg.clients, options.node_wait)
    ranks = [rank for _, rank in found.values()]
    if ranks != cfg.client_ranks():
        # Nodes declared their own ranks: the run's config records the ranks it ran with.
        cfg = cfg.replace(ranks=",".join(str(r) for r in ranks))
    folder = options.folder(cfg)
    fed = Federation(cfg, folder, progress=False)
    fed.resume_hint, fed.out_hint = "-c resume=true", "-c out=..."
    with fed.session(resume=options.resume, command=["flwr", "run", f"(run {run_id})"]) as st:
        return _rounds(grid, fed, st, found, options.round_timeout)


def _rounds(grid: Grid, fed: Federation, st: ServerState, found: dict, round_timeout: float) -> dict:
    """The rounds of a begun run over ``grid``, then its summary."""
    cfg = fed.cfg
    log.info("glora: writing the run to %s", fed.store.folder.resolve())
    # The pooled reference is one client (index 0, the largest rank) on partition 0's node.
    nodes = [NodeClient(found[i][0], i, r) for i, r in enumerate(fed.ranks)]

    def record_updates(t: int, clients: list[int], updates: list[ClientUpdate], weights: list[float]) -> None:
        fed.store.save_updates(t, update_record(st, t, clients, updates, weights))

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
        sizes=[len(p) for p in fed.parts],
        on_client_error=cfg.on_client_error,
        max_failed_fraction=cfg.max_failed_fraction,
        clip_update_norm=cfg.clip_update_norm,
        on_updates=record_updates if cfg.record_updates else None,
        round_offset=st.round,  # a resumed run goes on after its checkpoint's round
    )

    def end_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        t = server_round + strategy.round_offset
        record = strategy.last_record  # set by every aggregate_train that does not stop the run
        fed.end_round(st, t, record, strategy.round_started)
        if "eval" not in record:
            return None
        log.info("glora: %s", eval_line(t, record, fed.task.main_metric))
        return MetricRecord({k: float(v) for k, v in record["eval"].items()})

    strategy.start(
        grid,
        ArrayRecord(dict(st.head)),
        num_rounds=cfg.rounds - st.round,
        timeout=round_timeout,
        evaluate_fn=end_round,
    )
    summary = fed.finish(st)
    log.info("glora: finished; summary in %s", fed.store.path("summary.json").resolve())
    return summary
