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

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from glora.data.metrics import compute_metrics
from glora.federation.config import RunConfig
from glora.federation.simulation import Federation
from glora.models.device import to_device

torch.set_num_threads(1)
folder = sys.argv[1]
cfg = RunConfig.from_saved(json.loads(Path(folder, "config.json").read_text()))
fed = Federation(cfg.replace(threads=1), folder, progress=False)
fed.begin(resume=True)
st = fed.store.load_checkpoint()["state"]
task = fed.task
labels = task.eval.labels.numpy()

with fed.model.dense_update({n: s.delta() for n, s in st.layers.items()}, fed.ranks[0], st.head) as model:
    model.eval()
    margins = np.empty(len(labels))
    with torch.no_grad():
        for start in range(0, len(labels), 128):
            ids = task.eval.input_ids[start : start + 128]
            logits = model(**to_device(task.inputs(ids), "cpu")).logits
            margins[start : start + len(ids)] = (logits[:, 1] - logits[:, 0]).numpy()

preds = (margins > 0).astype(int)
# AUC = Mann-Whitney U / (n_pos * n_neg): the chance that an acceptable sentence outscores an
# unacceptable one.
u = mannwhitneyu(margins[labels == 1], margins[labels == 0]).statistic
auc = u / ((labels == 1).sum() * (labels == 0).sum())
print(
    f"{folder}: called acceptable {preds.mean():.3f} (truly {labels.mean():.3f}), "
    f"MCC {compute_metrics(task.name, preds, labels)['matthews_correlation']:.4f}, margin AUC {auc:.3f}"
)
