"""Scoring a completion against its references, as HELM does.

Every generation metric takes ``(completion, references)`` and returns the best score over the
references (an instance is right if it matches any of them). Normalization for the "quasi"
metrics and F1 follows HELM (and SQuAD before it): lowercase, drop punctuation and the articles
a/an/the, collapse whitespace.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """HELM's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(score: Callable[[str, str], float]) -> Callable[[str, Sequence[str]], float]:
    def over_references(completion: str, references: Sequence[str]) -> float:
        return max((score(completion, ref) for ref in references), default=0.0)

    over_references.__name__ = score.__name__
    over_references.__doc__ = score.__doc__
    return over_references


@_best
def exact_match(completion: str, reference: str) -> float:
    """1 if the completion equals the reference, ignoring surrounding whitespace."""
    return float(completion.strip() == reference.strip())


@_best
def quasi_exact_match(completion: str, reference: str) -> float:
    """1 if they are equal after ``normalize``."""
    return float(normalize(completion) == normalize(reference))


@_best
def prefix_exact_match(completion: str, reference: str) -> float:
    """1 if the completion starts with the reference (whitespace-stripped): the model answered
    and then went on."""
    return float(completion.strip().startswith(reference.strip()))


@_best
def f1(completion: str, reference: str) -> float:
    """Token-overlap F1 of the normalized texts (two empty texts agree: 1)."""
    predicted, gold = normalize(completion).split(), normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it loads nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@_best
def rouge_l(completion: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence, Porter-stemmed), via ``rouge-score``."""
    return _rouge_scorer().score(reference, completion)["rougeL"].fmeasure


GENERATION_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "quasi_exact_match": quasi_exact_match,
    "prefix_exact_match": prefix_exact_match,
    "f1": f1,
    "rouge_l": rouge_l,
}
# Multiple choice: 1 when the choice with the highest log-likelihood is the right one.
CHOICE_METRICS = ("accuracy",)
ALL_METRICS = (*GENERATION_METRICS, *CHOICE_METRICS)


def accuracy(logprobs: Sequence[float], answer: int) -> float:
    """1 if ``answer`` has the highest log-likelihood (the first one wins a tie)."""
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    return float(best == answer)


def score_completion(
    metrics: Sequence[str], completion: str, references: Sequence[str]
) -> dict[str, float]:
    """Every generation metric in ``metrics`` for one completion."""
    return {m: GENERATION_METRICS[m](completion, references) for m in metrics}
