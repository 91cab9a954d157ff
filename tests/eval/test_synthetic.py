import pytest

from hf_flexoffload.eval.synthetic import MODES, SPLIT_SIZES, synthetic_reasoning


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_instances_other_seed_others(mode):
    a, b = synthetic_reasoning(mode, seed=1), synthetic_reasoning(mode, seed=1)
    other = synthetic_reasoning(mode, seed=2)
    assert a["test"][:50] == b["test"][:50]
    assert a["test"]["input"][:50] != other["test"]["input"][:50]
    assert {s: len(a[s]) for s in a} == SPLIT_SIZES
    assert len(set(a["test"]["id"])) == SPLIT_SIZES["test"]


def test_pattern_match_answer_is_one_of_the_rules():
    for row in synthetic_reasoning("pattern_match")["test"].select(range(100)):
        rules = row["input"].removeprefix("Rules: ").split(" | Result: ")[0].split(" | ")
        assert len(rules) == 4 and row["reference"] in rules


def test_variable_substitution_answer_applies_the_substitution():
    for row in synthetic_reasoning("variable_substitution")["test"].select(range(100)):
        rule, subs = row["input"].removeprefix("Rules: ").split(" | Substitutions: ")
        mapping = {}
        for part in subs.split(" , "):
            symbol, word = part.split(' by " ')
            mapping[symbol] = word.removesuffix(' "')
        assert row["reference"] == " ".join(mapping.get(t, t) for t in rule.split())


def test_induction_results_share_the_rule():
    for row in synthetic_reasoning("induction")["test"].select(range(100)):
        rule = row["reference"].removeprefix("Rule: ").split()
        for result in row["input"].removeprefix("Two results: ").split(" | "):
            math = [t for t in result.split() if t in "+-*="]
            assert math == [t for t in rule if t in "+-*="]


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="pattern_match"):
        synthetic_reasoning("pattern")
