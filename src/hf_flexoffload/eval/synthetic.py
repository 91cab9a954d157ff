"""HELM's synthetic reasoning family, generated procedurally from a seed (no download).

After LIME (Wu et al., 2021) as HELM adapted it. A *rule* is a shuffled mix of 2-3 rule symbols
(X, Y, Z; repeats allowed) and 2-3 math symbols (+ - * =), e.g. ``X + Y = Y``. A *substitution*
maps each distinct symbol to one or two words (animals and fruits); applying it to the rule gives
a *result*, e.g. ``apple + lion peach = lion peach``. The three tasks:

* ``pattern_match``: four rules and a result; answer the rule that produced the result;
* ``variable_substitution``: a rule and a substitution; answer the result;
* ``induction``: two results of the same rule; answer ``Rule: <the rule>``.

The generator is our own; the vocabulary, symbol counts and split sizes follow HELM's, so the
task and its difficulty are the same, but the instances are not HELM's exact strings.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import DatasetDict

MODES = ("pattern_match", "variable_substitution", "induction")
SPLIT_SIZES = {"train": 1000, "validation": 5000, "test": 5000}
_ANIMALS = ("zebra", "cobra", "stork", "penguin", "shark", "lion", "buffalo", "whale", "seal")
_ANIMALS += ("eagle", "horse", "rat")
_FRUITS = ("apple", "peach", "watermelon", "banana", "grape", "kiwi", "pear", "strawberry")
_FRUITS += ("blueberry", "blackberry")
_WORDS = _ANIMALS + _FRUITS
_RULE_SYMBOLS = ("X", "Y", "Z")
_MATH_SYMBOLS = ("+", "-", "*", "=")


def _rule(rng: random.Random, rule_symbols: list[str], math_count: int) -> list[str]:
    tokens = rule_symbols + [rng.choice(_MATH_SYMBOLS) for _ in range(math_count)]
    rng.shuffle(tokens)
    return tokens


def _substitution(rng: random.Random, symbols: list[str]) -> dict[str, str]:
    return {s: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 2))) for s in symbols}


def _apply(rule: list[str], substitution: dict[str, str]) -> str:
    return " ".join(substitution.get(token, token) for token in rule)


def _instance(rng: random.Random, mode: str) -> tuple[str, str]:
    """(input, reference) of one instance."""
    rule_symbols = [rng.choice(_RULE_SYMBOLS) for _ in range(rng.randint(2, 3))]
    distinct = sorted(set(rule_symbols))
    math_count = rng.randint(2, 3)
    rule = _rule(rng, rule_symbols, math_count)
    first = _substitution(rng, distinct)
    result = _apply(rule, first)
    if mode == "variable_substitution":
        mapping = " , ".join(f'{s} by " {w} "' for s, w in first.items())
        return f"Rules: {' '.join(rule)} | Substitutions: {mapping}", result
    if mode == "induction":
        second = _apply(rule, _substitution(rng, distinct))
        return f"Two results: {result} | {second}", f"Rule: {' '.join(rule)}"
    # pattern_match: three distractor rules over the same symbols, the answer among them.
    rules = [" ".join(_rule(rng, list(distinct), math_count)) for _ in range(3)]
    rules.append(" ".join(rule))
    rng.shuffle(rules)
    return f"Rules: {' | '.join(rules)} | Result: {result}", " ".join(rule)


def synthetic_reasoning(mode: str, seed: int = 42) -> DatasetDict:
    """The ``train``/``validation``/``test`` splits of one task, with columns ``id``, ``input``
    and ``reference``. The same ``(mode, seed)`` always gives the same instances.

    Example:
        >>> synthetic_reasoning("induction")["test"][0]["reference"][:5]
        'Rule:'
    """
    from datasets import Dataset, DatasetDict  # heavy: imported when data is made

    if mode not in MODES:
        raise ValueError(f"Unknown synthetic_reasoning mode {mode!r}; choose from {MODES}.")
    rng = random.Random(f"synthetic_reasoning:{mode}:{seed}")
    splits = {}
    for split, size in SPLIT_SIZES.items():
        rows = [_instance(rng, mode) for _ in range(size)]
        splits[split] = Dataset.from_dict(
            {
                "id": [f"{mode}-{split}-{i}" for i in range(size)],
                "input": [r[0] for r in rows],
                "reference": [r[1] for r in rows],
            }
        )
    return DatasetDict(splits)
