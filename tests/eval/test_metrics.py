import pytest

from hf_flexoffload.eval import metrics


@pytest.mark.parametrize(
    "metric, completion, references, expected",
    [
        ("exact_match", " Paris \n", ["Paris"], 1.0),
        ("exact_match", "paris", ["Paris"], 0.0),
        ("exact_match", "Rome", ["Paris", "Rome"], 1.0),
        ("quasi_exact_match", "The Paris!", ["paris"], 1.0),
        ("quasi_exact_match", "Paris, France", ["paris"], 0.0),
        ("prefix_exact_match", " Paris is the capital", ["Paris"], 1.0),
        ("prefix_exact_match", "It is Paris", ["Paris"], 0.0),
        # normalized "cat sat" vs "cat sat down": P = 1, R = 2/3, F1 = 0.8
        ("f1", "The cat sat.", ["cat sat down"], 0.8),
        ("f1", "dog", ["cat sat down"], 0.0),
        ("f1", "", [""], 1.0),
        ("f1", "a", ["cat"], 0.0),  # "a" normalizes to nothing
        # LCS "the cat on the mat" = 5 of 6 tokens each way
        ("rouge_l", "the cat sat on the mat", ["the cat is on the mat"], 5 / 6),
        ("rouge_l", "cats running", ["cat runs"], 1.0),  # Porter-stemmed
    ],
    ids=[
        "em-strips-whitespace",
        "em-case-sensitive",
        "em-any-reference",
        "quasi-normalizes",
        "quasi-extra-words",
        "prefix",
        "prefix-not-at-start",
        "f1-partial",
        "f1-no-overlap",
        "f1-both-empty",
        "f1-articles-only",
        "rouge-l-lcs",
        "rouge-l-stemmed",
    ],
)
def test_generation_metrics_match_hand_computed(metric, completion, references, expected):
    score = metrics.GENERATION_METRICS[metric](completion, references)
    assert score == pytest.approx(expected)


def test_normalize_follows_helm():
    assert metrics.normalize("  The  Quick, brown fox!! An apple ") == "quick brown fox apple"


def test_no_references_scores_zero():
    assert metrics.exact_match("x", []) == 0.0


@pytest.mark.parametrize(
    "logprobs, answer, expected",
    [([-3.0, -0.5, -2.0], 1, 1.0), ([-3.0, -0.5, -2.0], 0, 0.0), ([-1.0, -1.0], 0, 1.0)],
    ids=["right", "wrong", "tie-first-wins"],
)
def test_accuracy(logprobs, answer, expected):
    assert metrics.accuracy(logprobs, answer) == expected


def test_score_completion_reports_every_metric():
    scores = metrics.score_completion(["exact_match", "f1"], "cat", ["cat", "dog"])
    assert scores == {"exact_match": 1.0, "f1": 1.0}
