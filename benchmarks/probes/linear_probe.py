"""Linear probes on the frozen MiniLM backbone: how much a first-token (CLS) read-out, the
backbone's pooler and the mean of the token states know about SST-2 sentiment before any
fine-tuning. L2-regularised logistic regression (L-BFGS) on 4,000 seeded training examples,
scored on the 872 validation sentences.

    python benchmarks/probes/linear_probe.py   # output: results/sst2-default-probes/linear_probe.txt
"""

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from glora.data import glue
from glora.models.backbones import resolve_backbone

torch.set_num_threads(1)
path = resolve_backbone("minilm")
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()


def features(rows):
    out = {"cls": [], "mean": [], "pooler": []}
    for i in range(0, len(rows), 128):
        batch = tokenizer(
            [r["sentence"] for r in rows[i : i + 128]],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        with torch.no_grad():
            res = model(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out["mean"].append((res.last_hidden_state * mask).sum(1) / mask.sum(1))
        out["cls"].append(res.last_hidden_state[:, 0])
        out["pooler"].append(res.pooler_output)
    return {k: torch.cat(v) for k, v in out.items()}


train = glue.load_glue("sst2", "train", None)
val = glue.load_glue("sst2", "validation", None)
sub = [train[i] for i in np.random.default_rng(0).permutation(len(train))[:4000]]
ft, fv = features(sub), features(val)
yt = torch.tensor([r["label"] for r in sub])
yv = torch.tensor([r["label"] for r in val])


def fit(X: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    """Logistic regression with an L2 penalty, by L-BFGS."""
    lin = torch.nn.Linear(X.shape[1], 2)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(X), y) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


for kind in ft:
    mu, sd = ft[kind].mean(0), ft[kind].std(0) + 1e-6
    X, Xv = (ft[kind] - mu) / sd, (fv[kind] - mu) / sd
    lin = fit(X, yt)
    with torch.no_grad():
        print(
            f"{kind}: validation accuracy {(lin(Xv).argmax(1) == yv).float().mean():.4f}, "
            f"train accuracy {(lin(X).argmax(1) == yt).float().mean():.4f}"
        )
