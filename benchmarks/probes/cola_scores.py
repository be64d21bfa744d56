"""What a finished CoLA run's global model predicts on its evaluation split: the share of
sentences called acceptable, MCC, and the ROC AUC of the logit margin (acceptable minus
unacceptable), which shows whether the scores order the sentences although every one falls on
one side of the threshold. From the run's last checkpoint; the run folder is only read.

    python benchmarks/probes/cola_scores.py RUN_FOLDER

Output: the table in results/cola-probes/README.md.
"""

import sys

import torch
from finished_state import last_state
from scipy.stats import mannwhitneyu

from glora.data.metrics import compute_metrics

torch.set_num_threads(1)
folder = sys.argv[1]
_, fed, st = last_state(folder)
task = fed.task
labels = task.eval.labels.numpy()
with fed.evaluation.global_model(st) as model:
    logits = task.eval_logits(model)
margins = (logits[:, 1] - logits[:, 0]).numpy()

preds = (margins > 0).astype(int)
# AUC = Mann-Whitney U / (n_pos * n_neg): the chance that an acceptable sentence outscores an
# unacceptable one.
u = mannwhitneyu(margins[labels == 1], margins[labels == 0]).statistic
auc = u / ((labels == 1).sum() * (labels == 0).sum())
print(
    f"{folder}: called acceptable {preds.mean():.3f} (truly {labels.mean():.3f}), "
    f"MCC {compute_metrics(task.name, preds, labels)['matthews_correlation']:.4f}, margin AUC {auc:.3f}"
)
