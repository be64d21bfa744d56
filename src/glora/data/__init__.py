"""GLUE data: task specs, readers (offline copy or hub), cached tokenisation, metrics, partitioners."""

from glora.cache import default_cache_dir
from glora.data.glue import (
    ALIASES,
    GLUE_TASKS,
    Encoded,
    TaskSpec,
    collate,
    get_task,
    load_glue,
    task_names,
    tokenize_task,
)
from glora.data.metrics import compute_metrics, main_metric
from glora.data.partition import dirichlet_partition, iid_partition, label_buckets, label_skew
from glora.data.paths import default_data_dir

__all__ = [
    "ALIASES",
    "GLUE_TASKS",
    "Encoded",
    "TaskSpec",
    "collate",
    "compute_metrics",
    "default_cache_dir",
    "default_data_dir",
    "dirichlet_partition",
    "get_task",
    "iid_partition",
    "label_buckets",
    "label_skew",
    "load_glue",
    "main_metric",
    "task_names",
    "tokenize_task",
]
