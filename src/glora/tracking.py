"""A run's metrics in the trackers people already follow runs with (``--report-to``, in the
style of transformers' ``report_to``): TensorBoard, MLflow, Weights & Biases. metrics.jsonl
stays the source of truth; a tracker gets a copy of each round's row (global and per-rank
metrics, loss, server time, bytes up and down) and the run config as hyper-parameters.

All three work offline: TensorBoard writes event files into ``<run folder>/tensorboard``,
MLflow into its tracking store (``MLFLOW_TRACKING_URI``: e.g. ``sqlite:///mlflow.db``, or a
``file:`` store with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow 3 keeps behind that
switch; else MLflow's default), wandb runs in offline mode unless ``WANDB_MODE`` says
otherwise. Each run is named after its folder and grouped by the folder above it (a sweep's
results folder: one tracked run per grid cell, grouped by sweep). A resumed run continues its
tracked runs (MLflow and wandb ids are kept in ``<run folder>/trackers.json``; TensorBoard
appends to its event files). The packages are optional (``pip install 'glora[tracking]'``); a
missing one is a clear error before the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from glora.files import atomic_write

# tracker -> (module it needs, package that brings it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
ROW_KEYS = ("train_loss", "server_seconds", "round_seconds", "bytes_up", "bytes_down", "peak_rss_mb")


def parse_report_to(text: str) -> list[str]:
    """'tensorboard,mlflow' -> the trackers; 'none' or '' -> none. ValueError for an unknown
    name or a tracker whose package is not installed."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name!r}: choose from none, {', '.join(TRACKERS)} (comma-separated)")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"--report-to {name} needs the {package} package: pip install {package} (or 'glora[tracking]')"
            )
    return names


def flatten(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row as flat numeric scalars: "eval/<metric>", "eval_by_rank/<r>/<metric>",
    "eval_personal/<metric>", ..., and the row's costs."""
    out = {k: float(record[k]) for k in ROW_KEYS if isinstance(record.get(k), int | float)}
    for key, value in record.items():
        if key.startswith("eval") and isinstance(value, Mapping):
            for name, v in value.items():
                if isinstance(v, Mapping):
                    out.update({f"{key}/{name}/{m}": float(x) for m, x in v.items() if isinstance(x, int | float)})
                elif isinstance(v, int | float):
                    out[f"{key}/{name}"] = float(v)
    return out


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, folder: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.writer.add_text(
            "config", "```\n" + json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n```"
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, folder: Path, name: str, group: str, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(group)
        run_id = tracked_ids(folder).get("mlflow")
        # A resumed run continues its tracked run: the rounds after the checkpoint join it.
        self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=name)
        if not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
            _keep_id(folder, "mlflow", self.run.info.run_id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        # MLflow's metric names take letters, digits and _ - . / and spaces.
        self.mlflow.log_metrics(dict(values), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, folder: Path, name: str, group: str, config: Mapping[str, Any]) -> None:
        import wandb

        run_id = tracked_ids(folder).get("wandb") or wandb.util.generate_id()
        self.run = wandb.init(
            project="glora",
            group=group,
            name=name,
            dir=str(folder),
            config=dict(config),
            mode=os.environ.get("WANDB_MODE", "offline"),
            id=run_id,
            resume="allow",  # a resumed run continues its tracked run
        )
        _keep_id(folder, "wandb", run_id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


_OPEN = {
    "tensorboard": lambda folder, name, group, config: _TensorBoard(folder, config),
    "mlflow": lambda folder, name, group, config: _MLflow(folder, name, group, config),
    "wandb": lambda folder, name, group, config: _Wandb(folder, name, group, config),
}


# The tracked runs of a run folder (tracker -> its run id), so that a resume continues them.
IDS_FILE = "trackers.json"


def tracked_ids(folder: Path) -> dict[str, str]:
    """The tracked run ids kept in ``folder`` ({} before a tracker opened there)."""
    path = Path(folder) / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _keep_id(folder: Path, tracker: str, run_id: str) -> None:
    ids = {**tracked_ids(folder), tracker: run_id}
    atomic_write(Path(folder) / IDS_FILE, (json.dumps(ids, indent=2) + "\n").encode())


def open_trackers(names: Sequence[str], folder: Path, config: Mapping[str, Any]) -> list[Tracker]:
    """The trackers of a run folder: its name is the run's, its parent folder's the group
    (a sweep's results folder: one tracked run per grid cell, grouped by sweep)."""
    folder = Path(folder)
    name, group = folder.name, folder.resolve().parent.name or "glora"
    return [_OPEN[tracker](folder, name, group, config) for tracker in names]
