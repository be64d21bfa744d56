"""Accuracy and share of positive predictions of a finished run's global model and of the
readout each client rank receives (SST-2 validation), from the run's last checkpoint.

    python results/sst2-default-probes/readouts.py RUN_FOLDER

Work on a copy of the folder: loading it as a resumable run rewrites its meta.json.
"""

import json
import sys
from pathlib import Path

import torch

from glora.data.metrics import compute_metrics
from glora.federation.config import RunConfig
from glora.federation.simulation import Federation

torch.set_num_threads(1)
folder = sys.argv[1]
cfg = RunConfig.from_saved(json.loads(Path(folder, "config.json").read_text()))
fed = Federation(cfg.replace(threads=1), folder, progress=False)
st = fed.begin(resume=True)
task = fed.task


def accuracy_and_positive_share(model):
    preds = task.predict(model)
    accuracy = compute_metrics(task.name, preds.numpy(), task.eval.labels.numpy())["accuracy"]
    return round(accuracy, 4), round(float(preds.float().mean()), 3)


with fed.global_model(st) as m:
    print("global", accuracy_and_positive_share(m))
for r, deltas in fed.received_deltas(st):
    with fed.model.dense_update(deltas, fed.ranks[0], st.head) as m:
        print("rank", r, accuracy_and_positive_share(m))
