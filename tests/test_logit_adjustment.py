"""The logit-adjusted client loss (Menon et al., 2021), the remedy for label skew behind
``--logit-adjustment``: what it adds to the logits, what it does to a single-class client,
and that adding the option left the identities of recorded runs as they were."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from glora.federation.checks import check_config
from glora.federation.client import local_train
from glora.federation.config import RunConfig
from glora.tasks.glue import GlueTask

ROOT = Path(__file__).resolve().parents[1]


class TinyClassifier(nn.Module):
    """Logits of a linear layer; the model's own loss is plain cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.head(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def _client(n_pos: int, n_neg: int, informative: bool):
    """A client's data: ``n_pos`` examples of class 1, ``n_neg`` of class 0; features either
    random or a constant (then only the head's bias can fit the labels)."""
    n = n_pos + n_neg
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1)) if informative else torch.ones(n, 4)
    labels = torch.tensor([1] * n_pos + [0] * n_neg)
    return (lambda idx: {"x": x[torch.as_tensor(idx)], "labels": labels[torch.as_tensor(idx)]}), x, labels


def _train(make_batch, x, labels, bias, steps=30, lr=0.1):
    model = TinyClassifier()
    losses = local_train(
        model,
        [],
        list(model.parameters()),
        make_batch,
        np.arange(len(labels)),
        steps,
        16,
        lr=lr,
        head_lr=lr,
        weight_decay=0.0,
        seed=0,
        logit_bias=bias,
    )
    with torch.no_grad():
        gap = (model.head(x)[:, 1] - model.head(x)[:, 0]).mean().item()
    return losses, gap


def test_first_step_loss_is_cross_entropy_of_the_shifted_logits():
    bias = torch.tensor([-3.0, 0.5])
    make_batch, x, labels = _client(64, 0, informative=True)
    first = np.random.default_rng(0).permutation(64)[:16]  # batch_indices' first batch, same seed
    batch = make_batch(first)
    with torch.no_grad():
        logits = TinyClassifier().head(batch["x"])
        expected = nn.functional.cross_entropy(logits + bias, batch["labels"]).item()
        plain = nn.functional.cross_entropy(logits, batch["labels"]).item()
    losses, _ = _train(make_batch, x, labels, bias)
    assert losses[0] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - plain) > 0.1  # the shift is visible in the loss


def test_a_skewed_client_learns_the_balanced_posterior_not_its_prior():
    """On features that carry no label information, plain cross-entropy fits the client's prior
    (logit gap log(58/6) = 2.27); the adjusted loss leaves the gap at log(58/6) minus the
    smoothed log prior ratio log(59/7), about 0.14: the client's skew stays out of the head."""
    make_batch, x, labels = _client(58, 6, informative=False)
    counts = torch.tensor([6.0, 58.0])
    log_prior = torch.log((counts + 1) / (counts.sum() + 2))
    _, plain_gap = _train(make_batch, x, labels, None, steps=400, lr=0.05)
    _, adjusted_gap = _train(make_batch, x, labels, log_prior, steps=400, lr=0.05)
    assert plain_gap == pytest.approx(np.log(58 / 6), abs=0.15)
    assert adjusted_gap == pytest.approx(np.log(58 / 6) - np.log(59 / 7), abs=0.15)


def test_log_label_prior_counts_the_clients_labels_with_add_one_smoothing():
    fake = SimpleNamespace(
        train=SimpleNamespace(labels=torch.tensor([0, 1, 1, 1, 0, 1])), spec=SimpleNamespace(num_labels=3)
    )
    prior = GlueTask.log_label_prior(fake, np.array([1, 2, 3, 5]))
    assert torch.allclose(prior.exp(), torch.tensor([1 / 7, 5 / 7, 1 / 7]))


def test_bad_values_are_refused_before_training():
    with pytest.raises(ValueError, match="logit-adjustment must be >= 0"):
        check_config(RunConfig(logit_adjustment=-1.0))
    with pytest.raises(ValueError, match="classification task"):
        check_config(RunConfig.for_task("stsb", logit_adjustment=1.0))
    with pytest.raises(ValueError, match="classification task"):
        check_config(RunConfig.for_task("superni", logit_adjustment=1.0))
    check_config(RunConfig(logit_adjustment=1.0))


def test_recorded_runs_keep_their_identity_and_the_option_makes_a_new_one():
    """A run recorded before the options existed (its config.json has no such keys) reads back
    as what it was (plain cross-entropy, first-token head at the factors' rate) under the identity it was saved with,
    so sweeps skip it; setting either option makes a new identity."""
    saved = json.loads((ROOT / "results/sst2-comparison/runs/glora/config.json").read_text())
    assert "logit_adjustment" not in saved and "pooling" not in saved and "head_lr_ratio" not in saved
    cfg = RunConfig.from_saved(saved)
    assert (cfg.logit_adjustment, cfg.pooling, cfg.head_lr_ratio) == (0.0, "cls", 1.0)
    assert cfg.identity() == saved["identity"]
    assert RunConfig.from_dict({k: v for k, v in saved.items() if k != "identity"}).pooling == "mean"  # today's default
    assert cfg.replace(logit_adjustment=1.0).identity() != saved["identity"]
    assert cfg.replace(pooling="mean").identity() != saved["identity"]
    assert cfg.replace(head_lr_ratio=10.0).identity() != saved["identity"]


@pytest.mark.slow
def test_each_client_trains_with_its_own_label_prior(tmp_path, monkeypatch):
    """On the real SST-2 path (a skewed partition), every client's loss is shifted by tau times
    the log of its own smoothed label frequencies, not the pooled ones."""
    from glora.federation import client as client_module
    from glora.federation.simulation import Federation

    seen = []
    real = client_module.local_train

    def spy(*args, **kwargs):
        seen.append((args[4], kwargs["logit_bias"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "local_train", spy)
    cfg = RunConfig(
        clients=3,
        alpha=0.3,
        min_client_examples=10,
        ranks="2,4,8",
        rounds=1,
        local_steps=1,
        batch_size=8,
        max_train_examples=300,
        max_eval_examples=32,
        threads=1,
        logit_adjustment=0.5,
    )
    fed = Federation(cfg, tmp_path / "run", progress=False)
    fed.run()
    labels = fed.task.train.labels
    assert len(seen) == 3
    priors = []
    for indices, bias in seen:
        counts = torch.bincount(labels[torch.as_tensor(indices)], minlength=2).double()
        assert torch.allclose(bias, 0.5 * torch.log((counts + 1) / (counts.sum() + 2)).float())
        priors.append(bias)
    assert not all(torch.allclose(priors[0], p) for p in priors[1:])  # skewed: the clients' priors differ
