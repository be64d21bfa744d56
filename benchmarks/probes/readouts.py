"""Accuracy and share of positive predictions of a finished run's global model and of the
readout each client rank receives (SST-2 validation), from the run's last checkpoint; the run
folder is only read.

    python benchmarks/probes/readouts.py RUN_FOLDER

Output: quoted in results/sst2-default-probes/README.md and results/sst2-default/README.md.
"""

import sys

import torch
from finished_state import last_state

from glora.data.metrics import compute_metrics

torch.set_num_threads(1)
_, fed, st = last_state(sys.argv[1])
task = fed.task


def accuracy_and_positive_share(model):
    preds = task.predict(model)
    accuracy = compute_metrics(task.name, preds.numpy(), task.eval.labels.numpy())["accuracy"]
    return round(accuracy, 4), round(float(preds.float().mean()), 3)


with fed.evaluation.global_model(st) as m:
    print("global", accuracy_and_positive_share(m))
for r, deltas in fed.evaluation.received_deltas(st):
    with fed.model.dense_update(deltas, fed.ranks[0], st.head) as m:
        print("rank", r, accuracy_and_positive_share(m))
