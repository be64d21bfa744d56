"""Partitioners on real GLUE labels: every example on exactly one client, skew that follows alpha."""

import numpy as np
import pytest
import torch

from glora.data import dirichlet_partition, iid_partition, label_buckets, label_skew, load_glue
from glora.data.partition import dirichlet_one_pass_partition

SEEDS = range(5)


@pytest.fixture(scope="module")
def mnli_labels():
    return np.array([r["label"] for r in load_glue("mnli_subset", "train")])  # 3 classes, 3,000 rows


@pytest.fixture(scope="module")
def stsb_labels():
    return np.array([r["label"] for r in load_glue("stsb", "train")])  # floats in [0, 5]


def assert_partition(parts, n):
    """Each of range(n) is in exactly one part: concatenated and sorted, the parts are 0..n-1."""
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1])
@pytest.mark.parametrize("which", ["mnli_labels", "stsb_labels"])
def test_dirichlet_split_is_a_partition_with_min_size(which, alpha, request):
    labels = request.getfixturevalue(which)
    for seed in SEEDS:
        parts = dirichlet_partition(labels, num_clients=10, alpha=alpha, seed=seed, min_size=20)
        assert len(parts) == 10
        assert_partition(parts, len(labels))
        assert min(len(p) for p in parts) >= 20
        assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("which", ["mnli_labels", "stsb_labels"])
def test_label_skew_grows_as_alpha_shrinks(which, request):
    labels = request.getfixturevalue(which)
    for seed in SEEDS:
        skews = [label_skew(dirichlet_partition(labels, 10, a, seed), labels) for a in (100.0, 1.0, 0.1)]
        assert skews[0] < skews[1] < skews[2], (seed, skews)
    # Near-IID at alpha 100: every client's mix is within a few points of the global one.
    assert label_skew(dirichlet_partition(labels, 10, 100.0, 0), labels) < 0.08


def test_same_seed_same_split_other_seed_other_split(mnli_labels):
    a = dirichlet_partition(mnli_labels, 8, 0.5, seed=3)
    b = dirichlet_partition(torch.tensor(mnli_labels), 8, 0.5, seed=3)  # a tensor of labels works alike
    c = dirichlet_partition(mnli_labels, 8, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(iid_partition(100, 7, 1), iid_partition(100, 7, 1), strict=True))


def test_iid_split_is_an_even_partition_with_little_skew(mnli_labels):
    n = len(mnli_labels)
    parts = iid_partition(n, 7, seed=0)
    assert_partition(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts, mnli_labels) < label_skew(dirichlet_partition(mnli_labels, 7, 0.1, 0), mnli_labels) / 4


def test_stsb_scores_fall_in_five_unit_buckets(stsb_labels):
    b = label_buckets(stsb_labels)
    assert set(np.unique(b)) == {0, 1, 2, 3, 4}
    assert np.array_equal(b, np.minimum(np.floor(stsb_labels), 4).astype(np.int64))  # [0,1), ..., [4,5]
    assert np.array_equal(label_buckets(np.array([2, 0, 1])), [2, 0, 1])  # class ids stay as they are


def test_label_skew_by_hand():
    labels = np.array([0, 0, 1, 1])
    assert label_skew([np.array([0, 1]), np.array([2, 3])], labels) == pytest.approx(0.5)  # pure vs 50/50
    assert label_skew([np.array([0, 2]), np.array([1, 3])], labels) == pytest.approx(0.0)
    # Only the examples in the parts define the global mix: one client holding all of them has no skew.
    assert label_skew([np.array([0, 1, 2])], labels) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha must be a positive number"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
        ({"num_clients": 0}, "num_clients must be a positive integer"),
        ({"num_clients": 101}, r"more clients \(101\) than examples \(100\)"),
        ({"num_clients": 10, "min_size": 11}, "need 110 examples, but there are 100"),
    ],
)
def test_bad_dirichlet_arguments(kwargs, match):
    labels = np.arange(100) % 2
    args = {"num_clients": 4, "alpha": 1.0, "seed": 0, "min_size": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(labels, **args)


def test_impossible_min_size_fails_after_bounded_retries():
    # One class and alpha 1e-3: each draw hands almost all examples to one client, so four
    # clients of at least 5 never happen; the search must stop and say what to change.
    with pytest.raises(ValueError, match=r"no Dirichlet split in 20 draws.*raise alpha, lower min_size"):
        dirichlet_partition(np.zeros(100, dtype=np.int64), 4, 1e-3, seed=0, min_size=5, max_retries=20)


def test_bad_iid_arguments():
    with pytest.raises(ValueError, match=r"more clients \(5\) than examples \(3\)"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(ValueError, match="num_clients must be a positive integer"):
        iid_partition(3, 0, seed=0)


def test_the_retry_cap_decides_whether_a_split_is_found_never_which():
    # CoLA's class counts (2,528 / 6,023): success depends only on the counts, and at 50
    # clients, alpha 0.5 and 20 each seed 2's first valid draw is the 1,545th
    y = np.repeat(np.array([0, 1]), [2528, 6023])
    with pytest.raises(ValueError, match="no Dirichlet split in 1000 draws"):
        dirichlet_partition(y, 50, 0.5, seed=2, min_size=20, max_retries=1000)
    parts = dirichlet_partition(y, 50, 0.5, seed=2, min_size=20)
    assert min(len(p) for p in parts) >= 20
    found = dirichlet_partition(y, 50, 0.5, seed=1, min_size=20, max_retries=200)
    again = dirichlet_partition(y, 50, 0.5, seed=1, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(found, again, strict=True))


@pytest.fixture(scope="module")
def sst2_labels():
    return np.array([r["label"] for r in load_glue("sst2", "train")])  # 67,349 rows, 2 classes


@pytest.mark.parametrize("clients", [10, 200, 1613])
def test_the_one_pass_split_reaches_any_number_of_clients(sst2_labels, clients):
    # The resampling scheme cannot make 200 SST-2 clients of 20 examples at alpha 0.5.
    if clients == 200:
        with pytest.raises(ValueError, match="use --partition-scheme one-pass"):
            dirichlet_partition(sst2_labels, clients, 0.5, seed=0, min_size=20, max_retries=200)
    parts = dirichlet_one_pass_partition(sst2_labels, clients, 0.5, seed=0, min_size=20)
    assert len(parts) == clients and min(len(p) for p in parts) >= 20
    assert_partition(parts, len(sst2_labels))
    again = dirichlet_one_pass_partition(sst2_labels, clients, 0.5, seed=0, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_the_one_pass_split_skews_labels_as_alpha_says(mnli_labels):
    skew = {
        alpha: np.mean(
            [label_skew(dirichlet_one_pass_partition(mnli_labels, 20, alpha, s, 10), mnli_labels) for s in SEEDS]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0] and skew[100.0] < 0.1 and skew[0.1] > 0.4


def test_ten_thousand_clients_split_in_one_pass(sst2_labels):
    parts = dirichlet_one_pass_partition(sst2_labels, 10_000, 0.5, seed=1, min_size=5)
    assert_partition(parts, len(sst2_labels))
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="6736 clients with at least min_size=10 examples each need 67360"):
        dirichlet_one_pass_partition(sst2_labels, 6736, 0.5, seed=1, min_size=10)


@pytest.mark.parametrize(
    ("clients", "alpha", "seed", "min_size", "fingerprint"),
    [(10, 0.5, 0, 20, "1be335a4456a191b"), (50, 0.5, 1, 20, "e5f76e9a104919b2"), (30, 0.1, 2, 10, "8f1731fc76541bcf")],
)
def test_the_redrawn_split_is_the_one_recorded_runs_were_made_with(clients, alpha, seed, min_size, fingerprint):
    """Run folders record the config, not the split: a change to how the redrawn scheme
    computes its draws must leave every split as it was (fingerprints from the code of
    commit dd7e133, before the draws stopped splitting rejected candidates)."""
    import hashlib

    y = np.random.default_rng(0).integers(0, 3, 6000)
    parts = dirichlet_partition(y, clients, alpha, seed, min_size)
    got = hashlib.sha256(b"|".join(p.astype(np.int64).tobytes() for p in parts)).hexdigest()[:16]
    assert got == fingerprint
