"""ROUGE-L as SuperNI scores it: rouge-score's rougeL F-measure with stemming, best reference,
mean per task, then over tasks."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from glora.data.rouge import rouge_l, score_tasks


def lcs_f(prediction: str, reference: str) -> float:
    """Hand-computed LCS F-measure x 100 on lower-cased whitespace tokens (cases without
    punctuation or stemmable words, where that is exactly rouge-score's tokenisation)."""
    p, r = prediction.lower().split(), reference.lower().split()
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall)


def test_hand_made_cases():
    # LCS "the cat on the mat" (5 of 6 tokens on each side): F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(
        lcs_f("the cat sat on the mat", "the cat is on the mat")
    )
    # Order matters for ROUGE-L (a subsequence), not for bag-of-words overlap: LCS is 1 of 3.
    assert rouge_l("c b a", ["a b c"]) == pytest.approx(100 / 3)
    assert rouge_l("no overlap", ["something else"]) == 0.0
    assert rouge_l("", ["yes"]) == 0.0


def test_case_punctuation_and_stemming_follow_superni():
    # SuperNI scores with use_stemmer=True: "Running dogs!" and "run dog" are the same stems.
    assert rouge_l("Running dogs!", ["run dog"]) == pytest.approx(100.0)
    assert rouge_l("Yes.", ["yes"]) == pytest.approx(100.0)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"]).score("run dog", "Running dogs!")["rougeL"].fmeasure
    assert unstemmed == 0.0  # without stemming the same pair would score nothing


def test_best_of_several_references():
    refs = ["a completely different answer", "the cat is on the mat", "cat"]
    expected = max(lcs_f("the cat sat on the mat", r) for r in refs)
    assert expected == pytest.approx(100 * 5 / 6)
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(expected)
    assert rouge_l("the cat sat on the mat", refs[::-1]) == pytest.approx(expected)


def test_agrees_with_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    cases = [
        ("The quick brown fox jumps.", ["A quick brown dog jumped over it", "the fox jumps"]),
        ("Positive", ["positive", "POSITIVE."]),
        ("He was running to the stations", ["he runs to the station", "station"]),
        ("1 2 3 4", ["4 3 2 1", "1 3"]),
    ]
    for prediction, refs in cases:
        expected = 100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in refs)
        assert rouge_l(prediction, refs) == pytest.approx(expected)


def test_per_task_mean_then_over_tasks_and_categories():
    predictions = {"t1": ["a b", "x"], "t2": ["a b c d"], "t3": ["z"]}
    references = {"t1": [["a b"], ["y"]], "t2": [["a b"]], "t3": [["z"]]}
    report = score_tasks(predictions, references, {"t1": "Cat A", "t2": "Cat A", "t3": "Cat B"})
    t2 = lcs_f("a b c d", "a b")  # P = 1/2, R = 1: F = 2/3
    assert report.per_task == pytest.approx({"t1": 50.0, "t2": t2, "t3": 100.0})
    # Macro over tasks: t1's two instances count once together, not twice.
    assert report.overall == pytest.approx((50.0 + t2 + 100.0) / 3)
    assert report.overall != pytest.approx((100 + 0 + t2 + 100) / 4)
    assert report.per_category == pytest.approx({"Cat A": (50.0 + t2) / 2, "Cat B": 100.0})
    assert report.num_instances == {"t1": 2, "t2": 1, "t3": 1}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="empty output reference"):
        rouge_l("x", [])
    with pytest.raises(ValueError, match="empty output reference"):
        rouge_l("x", ["", "  "])
    with pytest.raises(ValueError, match="list of strings"):
        rouge_l("x", "x")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_tasks({"t": ["a", "b"]}, {"t": [["a"]]}, {"t": "C"})
    with pytest.raises(ValueError, match="different tasks"):
        score_tasks({"t": ["a"]}, {"u": [["a"]]}, {"t": "C"})
    with pytest.raises(ValueError, match="no category"):
        score_tasks({"t": ["a"]}, {"t": [["a"]]}, {})
