"""The in-process driver: the round loop of ``glora run``, every client in this process.

Each round: sample clients, read out each one's adapter at its rank (the rule's state),
train locally, aggregate per layer with the rule, average the head, evaluate, merge what
the state says into the base weights, checkpoint. What a rule needs from the clients
comes from the rule (:class:`~glora.aggregation.base.ClientPlan`) and its state; this loop
never branches on a rule's name.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from glora.federation.checks import check_config
from glora.federation.client import adapted_model, train_client
from glora.federation.config import NOT_IDENTITY, RunConfig
from glora.federation.engine import (
    ClientUpdate,
    ServerState,
    aggregate_round,
    client_layout,
    client_steps,
    download_bytes,
    holdout_split,
    initial_adapters,
    readout,
    round_merges,
    sample_clients,
    update_record,
    upload_bytes,
)
from glora.federation.evaluation import Evaluation
from glora.federation.results import ADAPTER, CHECKPOINT, METRICS, SUMMARY, RunStore
from glora.federation.robust import settle_round
from glora.models.device import device_kind
from glora.models.lora import export_adapter
from glora.tasks import build_task
from glora.tracking import Tracker, flatten, open_trackers, parse_report_to


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Federation:
    """One federated run: ``Federation(cfg, out_dir).run()``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.rule = check_config(cfg)
        self.store = RunStore(Path(out_dir))
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.trackers: list[Tracker] = []
        # How the driver's user asks for a resume and names the run folder, for messages.
        self.resume_hint, self.out_hint = "--resume", "--out"
        self._bar: Progress | None = None  # the run's progress display while rounds run

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        loading = self.console.status(f"loading {cfg.task} and {cfg.backbone}...") if self.progress else nullcontext()
        with loading:
            self.task = build_task(cfg)
        split = holdout_split(self.task.partition(), cfg.personal_holdout, cfg.seed)
        self.parts, self.ranks = client_layout(cfg, self.task, self.rule, split)
        self.held = split[1]  # the clients' held-out shares (--personal-holdout), as they hold them
        self.model = adapted_model(self.task, cfg, self.ranks)
        self.init = initial_adapters(self.model, self.ranks, cfg.seed)
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.float64)
        self.evaluation = Evaluation(cfg, self.rule, self.task, self.model, self.ranks, self.held)

    # -- one round --------------------------------------------------------------------------------
    def _round(self, st: ServerState, t: int, bar) -> dict[str, Any]:
        cfg, plan = self.cfg, self.rule.client_plan(t)
        clients, updates, weights, bytes_down, failed = self.client_updates(st, t, bar)
        sampled = len(clients) + len(failed)
        settled = settle_round(
            t,
            sampled,
            clients,
            updates,
            weights,
            failed,
            cfg.on_client_error,
            cfg.max_failed_fraction,
            cfg.clip_update_norm,
            plan.train & plan.send,
        )
        if cfg.record_updates:  # what the rule aggregates this round (after screening and clipping)
            self.store.save_updates(t, update_record(st, t, settled.clients, settled.updates, settled.weights))
        for i, reason in sorted(settled.left_out.items()):
            self.console.print(f"[yellow]round {t}: left out client {i}[/yellow]: {reason}")
        bytes_up = sum(upload_bytes(u, plan) for u in settled.updates)
        record = aggregate_round(
            self.rule, st, t, settled.clients, settled.updates, settled.weights, bytes_down, bytes_up, sampled
        )
        return {**record, **settled.notes()}

    def client_updates(
        self, st: ServerState, t: int, bar=None
    ) -> tuple[list[int], list[ClientUpdate], list[float], int, dict[int, str]]:
        """The client half of round ``t`` from state ``st``: the clients that trained, their
        updates and aggregation weights, the bytes the server sent (every sampled client), and
        the clients whose training raised, with the error."""
        cfg, plan = self.cfg, self.rule.client_plan(t)
        if st.merges is None:
            st.merges = round_merges(st)  # a checkpoint of an older version did not keep them
        clients, updates, weights, failed = [], [], [], {}
        bytes_down = 0
        for i in sample_clients(len(self.parts), t, cfg.fraction, cfg.seed):
            r = self.ranks[i]
            factors = readout(st, self.init, r, self.model.settings.scale(r))
            bytes_down += download_bytes(factors, st.merges, st.head, plan)
            task_id = None
            if bar is not None:
                total = client_steps(cfg, self.rule, len(self.parts[i]))
                task_id = bar.add_task(f"  client {i} (rank {r})", total=total)
            try:
                update = train_client(
                    self.model,
                    self.task,
                    cfg,
                    self.rule,
                    t,
                    i,
                    self.parts[i],
                    factors,
                    st.head,
                    own=st.personal.get(i),
                    on_step=(lambda tid=task_id: bar.advance(tid)) if bar is not None else None,
                )
            except Exception as e:
                if cfg.on_client_error == "abort":
                    raise  # with its traceback: under abort a failing client may be a bug to find
                failed[i] = f"its training raised {type(e).__name__}: {e}"
                continue
            finally:
                if bar is not None:
                    bar.remove_task(task_id)
            clients.append(i)
            updates.append(update)
            weights.append(float(self.sizes[i]) if cfg.weighting == "examples" else 1.0)
        return clients, updates, weights, bytes_down, failed

    # -- the run ----------------------------------------------------------------------------------
    def begin(self, resume: bool = False, command: list[str] | None = None) -> ServerState:
        """Check the run folder, load the task and model, and return the state to start from
        (a fresh one, or the last checkpoint's with ``resume``). ``command`` goes to meta.json
        (default: this process's argv). A finished run kept without its checkpoint (as
        results/ keeps them) is refused: begun again, it would lose its config.json, meta.json
        and metrics. :func:`~glora.federation.results.open_run` reads such a folder."""
        cfg, store = self.cfg, self.store
        if resume and store.path(SUMMARY).exists() and not store.path(CHECKPOINT).exists():
            raise ValueError(
                f"{store.folder} holds a finished run ({SUMMARY}) and no {CHECKPOINT}: there is nothing to "
                "resume, and beginning it again would overwrite its config, meta and metrics; read it with "
                "glora.federation.results.open_run, or choose another --out"
            )
        existing = store.config()
        if existing is not None and not resume:
            raise ValueError(
                f"{store.folder} already holds a run; continue it with {self.resume_hint} or choose another "
                f"{self.out_hint}"
            )
        if existing is not None and existing.get("identity") != cfg.identity():
            saved = RunConfig.from_saved(existing).to_dict()
            changed = [
                f"{k.replace('_', '-')} {saved[k]!r} -> {v!r}"
                for k, v in cfg.to_dict().items()
                if saved.get(k) != v and k not in NOT_IDENTITY
            ]
            raise ValueError(
                f"{store.folder} holds a run with another config (identity {existing.get('identity')}, this one "
                f"{cfg.identity()}; changed: {', '.join(changed) or 'nothing visible'}); resume it with the same "
                "options or choose another --out"
            )
        self._setup()
        # The clients' own states live in files of the run folder (clients/), not in memory.
        st = ServerState(head=self.model.get_head(self.ranks[0]), personal=store.client_store())
        ckpt = store.load_checkpoint() if resume else None
        if store.torn_metrics_line():
            self.console.print(
                f"[yellow]dropping the torn last line of {store.path(METRICS)} (a crash while writing it); "
                "its round runs again[/yellow]"
            )
        if ckpt is not None:
            st = ckpt["state"]
            if st.base_offsets is not None:
                self.model.set_base_offsets(st.base_offsets)
            store.truncate_metrics(st.round)
            store.truncate_updates(st.round)
            store.note_resume(st.round, command=command, device=device_kind(cfg.device))
            self.console.print(f"[bold]resuming[/bold] {store.folder} after round {st.round}")
        else:
            # A new run, or one begun again from round 1 (no checkpoint): meta.json says where
            # and from which code this start was made, not an earlier start's machine.
            store.start(cfg.to_dict(), cfg.identity(), command=command, device=device_kind(cfg.device))
            store.truncate_metrics(0)
            store.truncate_updates(0)
        st.personal.prune()  # client files no checkpoint names: a cut round's, an earlier start's
        self.started = time.perf_counter() - st.elapsed
        return st

    def end_round(self, st: ServerState, t: int, record: dict[str, Any], t_round: float) -> None:
        """After round ``t``'s aggregation: evaluate (every eval_every rounds and at the end),
        export the final adapter, merge what the state says into the base weights, and store
        the metrics row and a checkpoint. ``t_round``: the round's start (perf_counter)."""
        cfg = self.cfg
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            record.update(self.evaluation.after_round(st, self._bar))
            if self.rule.reports_personal and (t == cfg.rounds or cfg.eval_clients is not None):
                # Every client's own model at the end; before, a seeded sample (--eval-clients).
                clients = self.evaluation.personal_clients(st, t)
                if clients:
                    record["eval_personal"] = self.evaluation.personal(st, clients)
                    if cfg.eval_clients is not None:
                        record["eval_personal_clients"] = clients
            if cfg.personal_holdout > 0 and t == cfg.rounds:
                record.update(self.evaluation.held_out(st))
        if t == cfg.rounds:
            self.export(st)
        st.merges = merges = round_merges(st)
        if merges:
            self.model.add_to_base(merges)
            st.base_offsets = self.model.base_offsets()
        record["round_seconds"] = time.perf_counter() - t_round
        record["peak_rss_mb"] = peak_rss_mb()
        st.round = t
        st.elapsed = time.perf_counter() - self.started
        self.store.append_metrics(record)
        self.store.save_checkpoint({"state": st, "config": cfg.to_dict()})
        for tracker in self.trackers:  # after the checkpoint: a round the trackers saw never runs again
            tracker.log(t, flatten(record))

    def evaluate_untuned(self, st: ServerState) -> None:
        """``--rounds 0``: the zero-shot reference. Evaluates the backbone as loaded (no
        adapter) and stores it as round 0, with an all-zero adapter as the export, so the run
        folder has the files of any other run."""
        t0 = time.perf_counter()
        record: dict[str, Any] = {
            "round": 0,
            "clients": [],
            "train_loss": None,
            "server_seconds": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "bytes_up_per_client": 0.0,
            "bytes_down_per_client": 0.0,
        }
        with self.model.dense_update({}, self.ranks[0], st.head) as m:
            record["eval"] = self.task.evaluate(m)
        self.export(st)
        record["round_seconds"] = time.perf_counter() - t0
        record["peak_rss_mb"] = peak_rss_mb()
        st.elapsed = time.perf_counter() - self.started
        self.store.append_metrics(record)
        self.store.save_checkpoint({"state": st, "config": self.cfg.to_dict()})
        for tracker in self.trackers:
            tracker.log(0, flatten(record))

    def finish(self, st: ServerState) -> dict[str, Any]:
        """Write and return the run's summary."""
        summary = self._summary(st)
        self.store.finish(summary)
        return summary

    @contextmanager
    def session(self, resume: bool = False, command: list[str] | None = None) -> Iterator[ServerState]:
        """The run folder held (its lock), the run begun (:meth:`begin`) and its trackers open
        for the duration of a ``with`` block, for either driver: yields the state to start from."""
        with self.store.lock():
            st = self.begin(resume, command=command)
            self.trackers = open_trackers(parse_report_to(self.cfg.report_to), self.store.folder, self.cfg.to_dict())
            try:
                yield st
            finally:
                for tracker in self.trackers:
                    tracker.close()

    def run(self, resume: bool = False) -> dict[str, Any]:
        with self.session(resume) as st:
            return self.run_rounds(st)

    def run_rounds(self, st: ServerState) -> dict[str, Any]:
        """The rounds from ``st`` to the last, then the summary (inside :meth:`session`)."""
        cfg = self.cfg
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
        if cfg.rounds == 0 and not self.store.metrics():
            self.evaluate_untuned(st)
            self.console.print(eval_line(0, self.store.metrics()[-1], self.task.main_metric))
        with prog as bar:
            bar = bar if self.progress else None
            self._bar = bar
            rounds_id = (
                bar.add_task(f"{cfg.rule} on {cfg.task}: rounds", total=cfg.rounds, completed=st.round)
                if bar is not None
                else None
            )
            for t in range(st.round + 1, cfg.rounds + 1):
                t_round = time.perf_counter()
                record = self._round(st, t, bar)
                self.end_round(st, t, record, t_round)
                if bar is not None:
                    bar.advance(rounds_id)
                    if "eval" in record:
                        bar.console.print(eval_line(t, record, self.task.main_metric))
        self._bar = None
        return self.finish(st)

    def export(self, st: ServerState) -> None:
        """The final global model as a peft adapter folder (+ head) relative to the pretrained weights."""
        totals = {}
        for n, shape in self.model.layer_shapes().items():
            d = st.layers[n].delta().float() if st.layers else torch.zeros(shape)  # no layers: no round ran
            totals[n] = d if st.base_offsets is None else d + st.base_offsets[n]
        # The run's own model serves the export: the backbone is not loaded a second time.
        export_adapter(self.store.path(ADAPTER), self.model, totals, st.head, self.task.lora, self.task.export_info)

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
            "final_heldout_global": last.get("eval_heldout_global"),
            "final_heldout_personal": last.get("eval_heldout_personal"),
            "wall_seconds": st.elapsed,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "server_seconds_total": sum(r["server_seconds"] for r in rows),
            # Each round's clients left out (failure policy; in Flower also lost nodes), by round.
            "left_out": {str(r["round"]): sorted(int(i) for i in r["left_out"]) for r in rows if r.get("left_out")},
        }


def eval_line(t: int, record: dict[str, Any], metric: str) -> str:
    line = f"round {t}: {metric} {record['eval'][metric]:.4f}"
    if "eval_by_rank" in record:
        line += "  by rank: " + ", ".join(f"r{r} {m[metric]:.4f}" for r, m in record["eval_by_rank"].items())
    if "eval_personal" in record:
        line += f"  personal {record['eval_personal'][metric]:.4f}"
    if record["train_loss"] is None:
        return line + "  (untuned backbone)"
    return line + f"  (loss {record['train_loss']:.4f})"


def run_federation(cfg: RunConfig, out_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning run into ``out_dir``; returns its summary."""
    return Federation(cfg, out_dir, progress=progress).run(resume=resume)
