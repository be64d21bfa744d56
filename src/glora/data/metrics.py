"""Each GLUE task's standard metrics, named as Hugging Face ``evaluate``'s glue metric names them.

Accuracy, binary F1 (positive class 1) and the Matthews correlation are written out here
from their confusion-matrix formulas (scikit-learn is not a dependency); Pearson and
Spearman (average ranks for ties) come from scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from torch import Tensor

from glora.data.arrays import as_vector
from glora.data.glue import TaskSpec, get_task

ArrayLike = Sequence[float] | np.ndarray | Tensor


def main_metric(task: str) -> str:
    """The metric a task is ranked by (e.g. ``"matthews_correlation"`` for cola)."""
    return get_task(task).main_metric


def compute_metrics(task: str | TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The task's metrics for predictions (n,) against labels (n,).

    Predictions are class ids (argmax of the logits) or, for STS-B, floats.
    A correlation that is undefined because one side is constant is reported as 0.0
    (scikit-learn's convention for the Matthews correlation), so scores stay comparable.
    """
    spec = get_task(task)
    pred = as_vector(predictions, "predictions")
    gold = as_vector(labels, "labels")
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels; they must be the same length")
    if len(pred) == 0:
        raise ValueError("no predictions to score")
    if spec.is_regression:
        pred, gold = pred.astype(np.float64), gold.astype(np.float64)
        return {
            "pearson": _correlation(stats.pearsonr, pred, gold),
            "spearmanr": _correlation(stats.spearmanr, pred, gold),
        }
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gold.dtype, np.integer)):
        raise ValueError(f"{spec.name} predictions and labels must be integer class ids (argmax of the logits)")
    for name, a in (("predictions", pred), ("labels", gold)):
        if a.min() < 0 or a.max() >= spec.num_labels:
            raise ValueError(f"{spec.name} {name} must be class ids in 0..{spec.num_labels - 1}")
    out = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(np.mean(pred == gold))
        elif name == "f1":
            out[name] = binary_f1(pred, gold)
        elif name == "matthews_correlation":
            out[name] = matthews_corrcoef(pred, gold)
        elif name == "f1_macro":
            out[name] = macro_f1(pred, gold)
    return out


def _correlation(fn, pred: np.ndarray, gold: np.ndarray) -> float:
    if len(pred) < 2 or np.all(pred == pred[0]) or np.all(gold == gold[0]):
        return 0.0
    return float(fn(pred, gold).statistic)


def binary_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class 1: 2 TP / (2 TP + FP + FN); 0.0 when there is no positive at all."""
    tp = int(np.sum((pred == 1) & (gold == 1)))
    fp = int(np.sum((pred == 1) & (gold != 1)))
    fn = int(np.sum((pred != 1) & (gold == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The unweighted mean over the classes present in ``gold`` or ``pred`` of each class's
    F1 (one against the rest), as scikit-learn's ``f1_score(average="macro")``."""
    present = sorted(set(pred.tolist()) | set(gold.tolist()))
    return float(np.mean([binary_f1((pred == c).astype(int), (gold == c).astype(int)) for c in present]))


def matthews_corrcoef(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of two binary label vectors; 0.0 when either is constant."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred != 1) & (gold != 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0
