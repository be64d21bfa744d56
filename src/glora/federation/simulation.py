"""The server round loop, simulated in one process.

Each round: sample clients, read out each one's adapter at its rank (the rule's state),
train locally, aggregate per layer with the rule, average the head, evaluate, merge what
the state says into the base weights, checkpoint. What a rule needs from the clients
comes from the rule (:class:`~glora.aggregation.base.ClientPlan`) and its state; this loop
never branches on a rule's name.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from glora.aggregation import LayerState, Rule, average_params, get_rule
from glora.aggregation.base import FACTORS
from glora.federation.client import local_train
from glora.federation.config import RunConfig
from glora.federation.results import ADAPTER, RunStore
from glora.federation.tasks import FederatedTask, GlueTask
from glora.lowrank import LowRank, lora_init_A, random_gauge_matrix
from glora.models.lora import AdaptedModel, export_adapter


@dataclass
class ServerState:
    """Everything the loop carries from one round to the next (and checkpoints)."""

    round: int = 0
    layers: dict[str, LayerState] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    base_offsets: dict[str, torch.Tensor] | None = None
    personal: dict[int, dict[str, Any]] = field(default_factory=dict)
    elapsed: float = 0.0


def build_task(cfg: RunConfig) -> FederatedTask:
    """The task family named by ``cfg.task``."""
    if cfg.task == "superni":
        from glora.federation.superni_task import SuperNITask

        return SuperNITask(cfg)
    return GlueTask(cfg)


def check_config(cfg: RunConfig) -> Rule:
    """Everything that can be checked before loading data or models; returns the rule."""
    rule = get_rule(cfg.rule, **cfg.rule_options)
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise ValueError(f"--alpha must be > 0 (Dirichlet concentration), got {cfg.alpha}; omit it for IID")
    for name, value in (
        ("clients", cfg.clients),
        ("rounds", cfg.rounds),
        ("local-steps", cfg.local_steps),
        ("batch-size", cfg.batch_size),
        ("eval-every", cfg.eval_every),
    ):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not 0 < cfg.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.weighting not in ("examples", "uniform"):
        raise ValueError(f"--weighting must be 'examples' or 'uniform', got {cfg.weighting!r}")
    if cfg.random_gauge and any(rule.client_plan(t).train != FACTORS for t in (1, 2)):
        raise ValueError(
            f"--random-gauge re-gauges both factors, but rule {cfg.rule!r} keeps one factor frozen and shared "
            "across clients; run the gauge control with rules that train B and A (e.g. glora, fedit, flora, "
            "flexlora, hetlora)"
        )
    ranks = cfg.client_ranks()
    if not rule.accepts_unequal_ranks and not rule.pooled and len(set(ranks)) > 1:
        raise ValueError(
            f"rule {cfg.rule!r} needs equal client ranks but --ranks {cfg.ranks!r} gives {sorted(set(ranks))}; "
            "use one rank (e.g. --ranks 8) or a rule that accepts different ranks (glora, flora, flexlora, "
            "hetlora, florist)"
        )
    return rule


def initial_adapters(model: AdaptedModel, ranks: list[int], seed: int) -> dict[int, dict[str, LowRank]]:
    """Round-1 adapters: B = 0 and a seeded LoRA A, the same for every client of a rank and
    nested across ranks (FFA-LoRA's shared frozen A, and a common start for every rule)."""
    shapes = model.layer_shapes()
    out: dict[int, dict[str, LowRank]] = {}
    for r in sorted(set(ranks)):
        scale = model.settings.scale(r)
        out[r] = {}
        for i, (name, (d_out, d_in)) in enumerate(sorted(shapes.items())):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            out[r][name] = LowRank(torch.zeros(d_out, r), lora_init_A(r, d_in, g), scale)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nbytes(x: LowRank | torch.Tensor | None, factors: frozenset[str] = frozenset({"A", "B"})) -> int:
    if x is None:
        return 0
    if isinstance(x, LowRank):
        return sum(t.numel() * t.element_size() for f, t in (("B", x.B), ("A", x.A)) if f in factors)
    return x.numel() * x.element_size()


def _head_bytes(head: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in head.values())


class Federation:
    """One federated run: ``Federation(cfg, out_dir).run()``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.rule = check_config(cfg)
        self.store = RunStore(Path(out_dir))
        self.console = console or Console(stderr=True)
        self.progress = progress

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        self.task = build_task(cfg)
        parts = self.task.partition()
        ranks = cfg.client_ranks()
        if self.rule.pooled:
            # Centralized reference: one client with everyone's data and everyone's steps.
            parts = [np.sort(np.concatenate(parts))]
            ranks = [max(ranks)]
        self.parts, self.ranks = parts, ranks
        self.model = AdaptedModel(self.task.model, self.task.lora, ranks)
        self.init = initial_adapters(self.model, ranks, cfg.seed)
        self.sizes = np.array([len(p) for p in parts], dtype=np.float64)

    def _sample(self, server_round: int) -> list[int]:
        n = len(self.parts)
        k = max(1, round(self.cfg.fraction * n))
        if k >= n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.seed, server_round, 17])
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))

    def _steps(self, client: int) -> int:
        cfg = self.cfg
        if cfg.local_epochs is not None:
            return max(1, int(np.ceil(cfg.local_epochs * len(self.parts[client]) / cfg.batch_size)))
        per_round = max(1, round(cfg.fraction * cfg.clients)) if self.rule.pooled else 1
        return cfg.local_steps * per_round

    # -- one round --------------------------------------------------------------------------------
    def _round(self, st: ServerState, t: int, bar) -> dict[str, Any]:
        cfg, model, rule = self.cfg, self.model, self.rule
        plan = rule.client_plan(t)
        clients = self._sample(t)
        updates: dict[str, list[LowRank]] = {}
        heads, weights, losses = [], [], []
        bytes_up = bytes_down = 0
        merges = {n: s.merge() for n, s in st.layers.items()} if st.layers else {}
        for i in clients:
            r = self.ranks[i]
            scale = model.settings.scale(r)
            factors = {n: s.readout(r, scale) for n, s in st.layers.items()} if st.layers else dict(self.init[r])
            own = st.personal.get(i)
            if own is not None:
                factors = {n: _keep_personal(f, own["factors"][n], plan.personal) for n, f in factors.items()}
            head = own["head"] if own is not None and not plan.share_head else st.head
            bytes_down += sum(_nbytes(f, frozenset({"A", "B"}) - plan.personal) for f in factors.values())
            bytes_down += sum(_nbytes(m) for m in merges.values()) + (_head_bytes(head) if plan.share_head else 0)
            model.set_factors(r, factors)
            model.set_head(r, head)
            params = model.activate(r, plan.train)
            steps = self._steps(i)
            task_id = bar.add_task(f"  client {i} (rank {r})", total=steps) if bar is not None else None
            loss = local_train(
                model.peft,
                params,
                model.head_parameters(r),
                self.task.batch,
                self.parts[i],
                steps,
                cfg.batch_size,
                cfg.lr,
                cfg.head_lr or cfg.lr,
                cfg.weight_decay,
                seed=cfg.seed * 1_000_003 + t * 1009 + i,
                on_step=(lambda tid=task_id: bar.advance(tid)) if bar is not None else None,
            )
            if bar is not None:
                bar.remove_task(task_id)
            losses.append(float(np.mean(loss)))
            trained = model.get_factors(r)
            new_head = model.get_head(r)
            if plan.personal or not plan.share_head:
                st.personal[i] = {"factors": trained, "head": new_head, "rank": r}
            if cfg.random_gauge:
                g = torch.Generator().manual_seed(cfg.seed * 7919 + t * 31 + i)
                G = random_gauge_matrix(r, g).float()
                trained = {n: f.gauge(G) for n, f in trained.items()}
            for n, f in trained.items():
                updates.setdefault(n, []).append(f)
            heads.append(new_head)
            weights.append(float(self.sizes[i]) if cfg.weighting == "examples" else 1.0)
            bytes_up += sum(_nbytes(f, plan.send) for f in trained.values())
            bytes_up += _head_bytes(new_head) if plan.share_head else 0
        t0 = time.perf_counter()
        st.layers = rule.aggregate_layers(updates, weights, previous=st.layers)
        if plan.share_head:
            st.head = average_params(heads, weights)
        server_seconds = time.perf_counter() - t0
        return {
            "round": t,
            "clients": clients,
            "train_loss": float(np.average(losses, weights=weights)),
            "server_seconds": server_seconds,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_up_per_client": bytes_up / len(clients),
            "bytes_down_per_client": bytes_down / len(clients),
        }

    # -- evaluation -------------------------------------------------------------------------------
    def _evaluate(self, st: ServerState) -> dict[str, Any]:
        """The global model (base + the state's full delta()) and, for unequal ranks, the model
        a client of each rank receives (base + merge + its readout)."""
        head_rank = self.ranks[0]
        out: dict[str, Any] = {}
        with self.model.dense_update({n: s.delta() for n, s in st.layers.items()}, head_rank, st.head) as m:
            out["eval"] = self.task.evaluate(m)
        if self.cfg.eval_ranks and len(set(self.ranks)) > 1:
            out["eval_by_rank"] = {}
            for r in sorted(set(self.ranks)):
                scale = self.model.settings.scale(r)
                deltas = {}
                for n, s in st.layers.items():
                    d = s.readout(r, scale).delta()
                    merged = s.merged_delta()
                    deltas[n] = d if merged is None else d + merged
                with self.model.dense_update(deltas, head_rank, st.head) as m:
                    out["eval_by_rank"][str(r)] = self.task.evaluate(m)
        return out

    def _evaluate_personal(self, st: ServerState) -> dict[str, float]:
        """Mean over clients of each client's own model (its last trained factors and head)."""
        per_client = []
        for _, own in sorted(st.personal.items()):
            deltas = {}
            for n, f in own["factors"].items():
                merged = st.layers[n].merged_delta()
                deltas[n] = f.delta() if merged is None else f.delta() + merged
            with self.model.dense_update(deltas, own["rank"], own["head"]) as m:
                per_client.append(self.task.evaluate(m))
        keys = per_client[0].keys()
        return {k: float(np.mean([c[k] for c in per_client])) for k in keys}

    # -- the run ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg, store = self.cfg, self.store
        existing = store.config()
        if existing is not None and not resume:
            raise ValueError(
                f"{store.folder} already holds a run; pass --resume to continue it or choose another --out"
            )
        if existing is not None and existing.get("identity") != cfg.identity():
            raise ValueError(
                f"{store.folder} holds a run with another config (identity {existing.get('identity')}, "
                f"this one {cfg.identity()}); resume it with the same options or choose another --out"
            )
        self._setup()
        st = ServerState(head=self.model.get_head(self.ranks[0]))
        ckpt = store.load_checkpoint() if resume else None
        if ckpt is not None:
            st = ckpt["state"]
            if st.base_offsets is not None:
                self.model.set_base_offsets(st.base_offsets)
            store.truncate_metrics(st.round)
            self.console.print(f"[bold]resuming[/bold] {store.folder} after round {st.round}")
        elif existing is None:
            store.start(cfg.to_dict(), cfg.identity())
        else:
            store.truncate_metrics(0)
        started = time.perf_counter() - st.elapsed
        prog = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            if self.progress
            else nullcontext()
        )
        with prog as bar:
            bar = bar if self.progress else None
            rounds_id = (
                bar.add_task(f"{cfg.rule} on {cfg.task}: rounds", total=cfg.rounds, completed=st.round)
                if bar is not None
                else None
            )
            for t in range(st.round + 1, cfg.rounds + 1):
                t_round = time.perf_counter()
                record = self._round(st, t, bar)
                if t % cfg.eval_every == 0 or t == cfg.rounds:
                    record.update(self._evaluate(st))
                    if self.rule.reports_personal and t == cfg.rounds:
                        record["eval_personal"] = self._evaluate_personal(st)
                if t == cfg.rounds:
                    self._export(st)
                merges = {n: m for n, s in st.layers.items() if (m := s.merge()) is not None}
                if merges:
                    self.model.add_to_base(merges)
                    st.base_offsets = self.model.base_offsets()
                record["round_seconds"] = time.perf_counter() - t_round
                record["peak_rss_mb"] = peak_rss_mb()
                st.round = t
                st.elapsed = time.perf_counter() - started
                store.append_metrics(record)
                store.save_checkpoint({"state": st, "config": cfg.to_dict()})
                if bar is not None:
                    bar.advance(rounds_id)
                    if "eval" in record:
                        bar.console.print(_eval_line(t, record, self.task.main_metric))
        summary = self._summary(st)
        store.finish(summary)
        return summary

    def _export(self, st: ServerState) -> None:
        """The final global model as a peft adapter folder (+ head) relative to the pretrained weights."""
        totals = {}
        for n, s in st.layers.items():
            d = s.delta().float()
            totals[n] = d if st.base_offsets is None else d + st.base_offsets[n]
        export_adapter(self.store.path(ADAPTER), self.task.fresh_model(), totals, st.head, self.task.lora)

    def _summary(self, st: ServerState) -> dict[str, Any]:
        rows = self.store.metrics()
        last = rows[-1]
        metric = self.task.main_metric
        final = last.get("eval_personal") if self.rule.reports_personal else last.get("eval")
        return {
            "task": self.cfg.task,
            "rule": self.cfg.rule,
            "identity": self.cfg.identity(),
            "rounds": st.round,
            "main_metric": metric,
            "final": final,
            "final_global": last.get("eval"),
            "final_by_rank": last.get("eval_by_rank"),
            "final_personal": last.get("eval_personal"),
            "wall_seconds": st.elapsed,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "server_seconds_total": sum(r["server_seconds"] for r in rows),
        }


def _keep_personal(readout: LowRank, own: LowRank, personal: frozenset[str]) -> LowRank:
    """The readout with the client's own B and/or A where the rule keeps them on the client."""
    B = own.B if "B" in personal else readout.B
    A = own.A if "A" in personal else readout.A
    return LowRank(B, A, readout.scale)


def _eval_line(t: int, record: dict[str, Any], metric: str) -> str:
    line = f"round {t}: {metric} {record['eval'][metric]:.4f}"
    if "eval_by_rank" in record:
        line += "  by rank: " + ", ".join(f"r{r} {m[metric]:.4f}" for r, m in record["eval_by_rank"].items())
    if "eval_personal" in record:
        line += f"  personal {record['eval_personal'][metric]:.4f}"
    return line + f"  (loss {record['train_loss']:.4f})"


def run_federation(cfg: RunConfig, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning run into ``out_dir``; returns its summary."""
    return Federation(cfg, out_dir, progress=progress).run(resume=resume)
