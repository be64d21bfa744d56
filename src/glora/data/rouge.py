"""ROUGE-L as SuperNI scores it.

SuperNI's evaluation script (allenai/natural-instructions, eval/automatic/evaluation.py,
default English track) scores a prediction with rouge-score's
``RougeScorer(['rougeL'], use_stemmer=True)``, i.e. its default tokenizer (lower-case,
non-alphanumerics to spaces, Porter stemming of words longer than three letters), takes the
F-measure, the maximum over the instance's references, and reports it x 100. Here the
instance scores are averaged per task, the task scores over tasks (the headline number)
and over the tasks of each category. With the same number of instances in every task this
equals SuperNI's instance average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean

from rouge_score import rouge_scorer, tokenizers

# The scorer SuperNI builds (the default tokenizer with stemming), given its tokenizer
# explicitly: built without one, rouge-score logs through absl, whose first message calls
# logging.basicConfig() and so prints every later log line of the process twice (Flower's).
_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x 100 of ``prediction`` against its best reference."""
    if isinstance(references, str):
        raise ValueError("references must be a list of strings, not one string")
    if not references or not any(r.strip() for r in references):
        raise ValueError(f"empty output reference {list(references)!r}: every instance needs a non-blank reference")
    return 100.0 * max(
        _SCORER.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in references if r.strip()
    )


@dataclass(frozen=True)
class RougeReport:
    """Scores x 100: ``overall`` is the mean over tasks of the per-task means."""

    overall: float
    per_task: dict[str, float]
    per_category: dict[str, float]
    num_instances: dict[str, int]


def score_tasks(
    predictions: Mapping[str, Sequence[str]],
    references: Mapping[str, Sequence[Sequence[str]]],
    categories: Mapping[str, str],
) -> RougeReport:
    """Per-task, per-category and overall ROUGE-L.

    predictions[task][i] is scored against references[task][i]; categories maps each task
    to its category.
    """
    if set(predictions) != set(references):
        raise ValueError(
            f"predictions and references cover different tasks: {sorted(set(predictions) ^ set(references))}"
        )
    if not predictions:
        raise ValueError("nothing to score: no tasks")
    per_task, counts = {}, {}
    for task, preds in predictions.items():
        refs = references[task]
        if len(preds) != len(refs) or not preds:
            raise ValueError(f"task {task}: {len(preds)} predictions for {len(refs)} references (need equal, >= 1)")
        if task not in categories:
            raise ValueError(f"task {task} has no category")
        per_task[task] = fmean(rouge_l(p, r) for p, r in zip(preds, refs, strict=True))
        counts[task] = len(preds)
    by_category: dict[str, list[float]] = {}
    for task, score in per_task.items():
        by_category.setdefault(categories[task], []).append(score)
    return RougeReport(
        overall=fmean(per_task.values()),
        per_task=dict(sorted(per_task.items())),
        per_category={c: fmean(v) for c, v in sorted(by_category.items())},
        num_instances=dict(sorted(counts.items())),
    )
