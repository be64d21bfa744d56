"""One round's client updates, aggregated by several server rules: what each keeps of their
exact weighted mean, and how the resulting global model scores (SST-2 validation).

    python benchmarks/probes/same_updates.py RUN_FOLDER > results/alpha01-probes/round11_from_RULE_seedS.md

RUN_FOLDER: a finished run folder with its checkpoint.pt, only read. The clients train one
round from its last checkpoint's state (round T+1, the run's own seed formula). Every rule
then aggregates the same updates, so the rows differ by the server alone.

The dense per-layer mean is formed here (384 x 384 layers of MiniLM): a diagnostic, not
the server path, which never builds it.
"""

import sys

import torch
from finished_state import last_state

from glora.aggregation import average_params, get_rule, normalize_weights
from glora.data.metrics import compute_metrics

RULES = {
    "glora (projector consensus, R 8)": ("glora", {"rank": "max"}),
    "glora (energy consensus, R 8)": ("glora", {"rank": "max", "consensus": "energy"}),
    "glora (projector consensus, R 16)": ("glora", {"rank": 16}),
    "glora (projector consensus, R 32)": ("glora", {"rank": 32}),
    "flexlora (the mean's SVD, every direction kept)": ("flexlora", {}),
    "fedit (mean B x mean A)": ("fedit", {}),
}

torch.set_num_threads(1)
folder = sys.argv[1]
saved, fed, st = last_state(folder)
cfg = saved.config
if st.base_offsets:
    raise SystemExit(f"{folder}: the state merged updates into the base weights; this probe compares states without")
task, t = fed.task, st.round + 1

_, updates, weights, _, _ = fed.client_updates(st, t)
w = normalize_weights(weights, len(weights))
head = average_params([u.head for u in updates], weights)
by_layer = {n: [u.factors[n] for u in updates] for n in updates[0].factors}
mean = {n: sum(wi * f.delta().double() for wi, f in zip(w, fs, strict=True)) for n, fs in by_layer.items()}
mean_sq = sum(float(m.pow(2).sum()) for m in mean.values())


def score(deltas: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The global model's main metric and its share of positive predictions."""
    with fed.model.dense_update({n: d.float() for n, d in deltas.items()}, fed.ranks[0], head) as m:
        preds = task.predict(m)
    metrics = compute_metrics(task.name, preds.numpy(), task.eval.labels.numpy())
    return metrics[task.main_metric], float(preds.float().mean())


def relative_error(deltas: dict[str, torch.Tensor]) -> float:
    """||aggregate - exact mean||_F / ||exact mean||_F over every adapted layer. For GLoRA
    (Delta_g = U U^T mean) it is the share of the mean that its consensus subspace leaves out."""
    err = sum(float((deltas[n].double() - m).pow(2).sum()) for n, m in mean.items())
    return (err / mean_sq) ** 0.5


run = f"rule {cfg.rule}, alpha {cfg.alpha}, seed {cfg.seed}, ranks {cfg.ranks}"
print(f"# {folder}: {run}; clients' round {t} (from the round-{t - 1} state)\n")
loss = sum(u.loss for u in updates) / len(updates)
print(f"client weights: {[round(x, 3) for x in w.tolist()]}; mean training loss {loss:.4f}\n")
rows = {"exact weighted mean (dense)": mean}
for name, (rule, options) in RULES.items():
    layers = get_rule(rule, **options).aggregate_layers(by_layer, weights)
    rows[name] = {n: s.delta() for n, s in layers.items()}
    if rule == "flexlora":
        r = max(fed.ranks)
        readouts = {n: s.readout(r, fed.model.settings.scale(r)).delta() for n, s in layers.items()}
        rows[f"flexlora's readout at rank {r} (the mean's best rank-{r} approximation)"] = readouts
print(f"| server | {task.main_metric} | positive share | relative error to the exact mean |")
print("| --- | ---: | ---: | ---: |")
for name, deltas in rows.items():
    metric, positive = score(deltas)
    print(f"| {name} | {metric:.4f} | {positive:.3f} | {relative_error(deltas):.4f} |")
