"""What a finished CoLA run's global model predicts on its evaluation split: the share of
sentences called acceptable, MCC, and the ROC AUC of the logit margin (acceptable minus
unacceptable), which shows whether the scores order the sentences although every one falls on
one side of the threshold. From the run's last checkpoint.

    python results/cola-probes/scores.py COPY_OF_A_RUN

Work on a copy of the folder: loading it as a resumable run rewrites its meta.json.
"""

import json
import sys
from pathlib import Path

import torch
from scipy.stats import mannwhitneyu

from glora.data.metrics import compute_metrics
from glora.federation.config import RunConfig
from glora.federation.simulation import Federation

torch.set_num_threads(1)
folder = sys.argv[1]
cfg = RunConfig.from_saved(json.loads(Path(folder, "config.json").read_text()))
fed = Federation(cfg.replace(threads=1), folder, progress=False)
st = fed.begin(resume=True)
task = fed.task
labels = task.eval.labels.numpy()
with fed.global_model(st) as model:
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
