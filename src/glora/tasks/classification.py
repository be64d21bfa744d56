"""Classification or regression on the user's own labelled texts (``--dataset``).

``glora run --dataset PATH --text-column COL [--text-pair-column COL] --label-column COL``:
labels may be strings or integers (the label set is read from the training split and sorted;
its names go into the exported adapter's ``id2label``); a float label column is a regression
target (``--regression``, or inferred when its values are not whole numbers, and said so).
Metrics: accuracy and macro-F1 (and the Matthews correlation for two classes), or Pearson
and Spearman for regression; ``--metric`` picks the main one. Partitions: IID, Dirichlet
label skew, or ``--partition-column`` (each distinct value's rows to one client).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Console

from glora.data.dataset_files import Splits, read_splits, require_columns
from glora.data.glue import TaskSpec
from glora.tasks.glue import GROUP, ClassificationTask

if TYPE_CHECKING:  # annotations only: the tasks sit below the federation layer
    from glora.federation.config import RunConfig

CLASSIFICATION_METRICS = ("accuracy", "f1_macro")
REGRESSION_METRICS = ("pearson", "spearmanr")


def check_dataset_options(cfg: RunConfig, needed: dict[str, str]) -> None:
    """ValueError before any loading when --dataset or a column option the task needs is missing."""
    if not cfg.dataset:
        raise ValueError(f"task {cfg.task!r} reads your data: give --dataset PATH (a file, a folder or a hub id)")
    missing = [f"--{k.replace('_', '-')}" for k, v in needed.items() if not v]
    if missing:
        raise ValueError(f"task {cfg.task!r} needs {' and '.join(missing)} (the columns of --dataset to read)")


def is_float_target(values: list[Any]) -> bool:
    """Whether label values are numbers that are not all whole (a regression target)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and any(
        isinstance(v, float) and not float(v).is_integer() for v in values
    )


def label_rows(
    splits: Splits, cfg: RunConfig, console: Console
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], TaskSpec]:
    """The rows as ClassificationTask reads them (text fields, integer or float ``label``,
    the partition value) and the task's spec. ValueError naming the problem."""
    fields = tuple(c for c in (cfg.text_column, cfg.text_pair_column) if c)
    for split, rows in (("train", splits.train), ("validation", splits.validation)):
        for i, r in enumerate(rows):
            value = r[cfg.label_column]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{split} row {i}: label column {cfg.label_column!r} is empty")
            if isinstance(value, float) and value.is_integer() and cfg.regression is not True:
                r[cfg.label_column] = int(value)  # a column with gaps reads as floats: 1.0 is the class 1
    train_labels = [r[cfg.label_column] for r in splits.train]
    regression = cfg.regression if cfg.regression is not None else is_float_target(train_labels)
    if regression and cfg.regression is None:
        console.print(
            f"[yellow]label column {cfg.label_column!r} holds fractional numbers: a regression target "
            "(Pearson, Spearman); pass --no-regression to treat its values as classes[/yellow]"
        )
    if regression:
        names: tuple[str, ...] = ()
        index = None
    else:
        names = tuple(str(v) for v in sorted(set(train_labels), key=lambda v: (isinstance(v, str), v)))
        if len(names) < 2:
            raise ValueError(
                f"--label-column {cfg.label_column!r} has one class ({names[0]!r}) in the training split: "
                "classification needs at least two"
            )
        index = {n: i for i, n in enumerate(names)}

    def convert(split: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(rows):
            for f in fields:
                if not isinstance(r[f], str) or not r[f].strip():
                    raise ValueError(
                        f"{split} row {i}: column {f!r} is empty or not text ({r[f]!r}); every row needs text"
                    )
            value = r[cfg.label_column]
            if value is None:
                raise ValueError(f"{split} row {i}: label column {cfg.label_column!r} is empty")
            if regression:
                try:
                    label: Any = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{split} row {i}: label {value!r} is not a number (regression)") from None
                if not math.isfinite(label):
                    raise ValueError(f"{split} row {i}: label {value!r} is not finite")
            else:
                if str(value) not in index:
                    raise ValueError(
                        f"{split} row {i}: label {value!r} does not occur in the training split, whose labels are "
                        f"{', '.join(names)}"
                    )
                label = index[str(value)]
            row = {f: r[f] for f in fields} | {"label": label}
            if cfg.partition_column:
                row[GROUP] = r[cfg.partition_column]
            out.append(row)
        return out

    metrics = (
        REGRESSION_METRICS
        if regression
        else CLASSIFICATION_METRICS + (("matthews_correlation",) if len(names) == 2 else ())
    )
    main = cfg.metric or metrics[0]
    if main not in metrics:
        raise ValueError(f"--metric {main!r}: this task reports {', '.join(metrics)}")
    spec = TaskSpec(
        name="classification",
        folder="",
        text_fields=fields,
        num_labels=1 if regression else len(names),
        metrics=metrics,
        main_metric=main,
        label_names=names,
        hub=("", ""),
    )
    return convert("train", splits.train), convert("validation", splits.validation), spec


class DatasetClassificationTask(ClassificationTask):
    """The user's labelled texts on an encoder with a classification or regression head."""

    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        check_dataset_options(cfg, {"text_column": cfg.text_column, "label_column": cfg.label_column})
        if not 0 < cfg.validation_fraction < 1:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {cfg.validation_fraction}")

    @classmethod
    def has_labels(cls, cfg: RunConfig) -> bool:
        return not cfg.regression

    def __init__(self, cfg: RunConfig, console: Console | None = None) -> None:
        self.check_config(cfg)
        console = console or Console(stderr=True)
        splits = read_splits(cfg.dataset, cfg.validation_fraction, cfg.dataset_config, cfg.dataset_revision)
        require_columns(
            splits,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            partition_column=cfg.partition_column,
        )
        train, validation, spec = label_rows(splits, cfg, console)
        if spec.is_regression and cfg.logit_adjustment:
            raise ValueError("--logit-adjustment needs class labels; this label column is a regression target")
        needed = cfg.clients * cfg.min_client_examples
        if cfg.alpha is not None and not cfg.partition_column and len(train) < needed:
            raise ValueError(
                f"--dataset {cfg.dataset}: {len(train)} training rows for {cfg.clients} clients of at least "
                f"{cfg.min_client_examples} (min_client_examples) each; use fewer --clients, --alpha iid, or more data"
            )
        super().__init__(cfg, spec, train, validation)
