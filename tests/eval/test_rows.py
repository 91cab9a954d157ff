"""Missing data is an error: a missing or null prompt field, reference, choice or answer is
refused with its row number and column (``--skip-invalid`` skips such rows, counted)."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_flexoffload.eval import ScenarioSpec, build_instances
from hf_flexoffload.eval.rows import InvalidRowsError, row_problems
from hf_flexoffload.eval.scenario import load_splits

GOOD = {"question": "2+2", "answer": "4", "options": ["3", "4"], "gold": 1}


def _spec(**kw) -> ScenarioSpec:
    base = dict(source="data.jsonl", prompt_template="Q: {question}\nA:", reference_column="answer")
    return ScenarioSpec(**{**base, **kw})


MC = dict(choices_column="options", answer_column="gold", metrics=("accuracy",))


@pytest.mark.parametrize(
    "bad, kwargs, column",
    [
        ({"answer": None}, {}, "'answer' (reference) is missing or null"),
        ({"question": None}, {}, "'question' (prompt) is missing or null"),
        ({"answer": []}, {}, "'answer' (reference) is an empty list"),
        ({"options": None}, MC, "'options' (choices) is missing or null"),
        ({"options": ["3", None]}, MC, "'options' (choices) holds a null"),
        ({"gold": None}, MC, "'gold' (answer) is missing or null"),
    ],
    ids=["reference", "prompt", "empty-references", "choices", "null-choice", "answer"],
)
def test_row_with_missing_data_is_refused_with_row_and_column(bad, kwargs, column):
    rows = [dict(GOOD), dict(GOOD), {**GOOD, **bad}]
    if isinstance(bad.get("answer"), list):  # one column type: lists everywhere
        rows = [{**r, "answer": r["answer"] if isinstance(r["answer"], list) else [r["answer"]]}
                for r in rows]  # fmt: skip
    data = DatasetDict({"test": Dataset.from_list(rows)})
    with pytest.raises(InvalidRowsError, match="row 3: " + re.escape(column)) as err:
        build_instances(_spec(**kwargs), data)
    assert err.value.rows == [3]
    assert "--skip-invalid" in str(err.value)
    skipped: list[int] = []
    kept = build_instances(_spec(skip_invalid=True, **kwargs), data, skipped=skipped)
    assert len(kept) == 2 and skipped == [3]


def test_missing_json_keys_and_empty_csv_cells_are_refused(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in [GOOD, {"question": "1+1"}, {"answer": "3"}]) + "\n"
    )
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n2+2,4\n3+3,\n")
    for path, rows in ((jsonl, [2, 3]), (csv, [2])):
        spec = _spec(source=str(path))
        with pytest.raises(InvalidRowsError) as err:
            build_instances(spec, load_splits(spec))
        assert err.value.rows == rows


def test_invalid_shot_rows_are_refused_or_never_drawn():
    train = Dataset.from_list([dict(GOOD), {**GOOD, "answer": None}])
    data = DatasetDict({"test": Dataset.from_list([dict(GOOD)]), "train": train})
    with pytest.raises(InvalidRowsError, match="split 'train'"):
        build_instances(_spec(num_shots=2), data)
    (inst,) = build_instances(_spec(num_shots=2, skip_invalid=True), data)
    assert "None" not in inst.prompt and inst.prompt.count("Q: ") == 2


def test_every_row_invalid_is_nothing_to_evaluate():
    data = DatasetDict({"test": Dataset.from_list([{**GOOD, "answer": None}])})
    with pytest.raises(ValueError, match="nothing to evaluate"):
        build_instances(_spec(skip_invalid=True), data)


def test_row_problems_are_empty_for_a_good_row():
    assert row_problems(GOOD, {"question": "prompt", "options": "choices", "gold": "answer"}) == []
    wrong = row_problems(GOOD, {"question": "choices"})
    assert wrong == ["'question' (choices) is str, not a list"]


# -- fuzz: random rows (missing, extra, null fields, odd types) load into instances or fail with
# a clear ValueError, never an uncaught exception or a silent "None" ------------------------------

VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.text(max_size=5)
    | st.lists(st.none() | st.text(max_size=3) | st.integers(0, 3), max_size=3)
)
ROW = st.dictionaries(st.sampled_from(["question", "answer", "options", "gold", "x"]), VALUES)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(ROW, min_size=1, max_size=4), mc=st.booleans(), skip=st.booleans())
def test_loader_fuzz(tmp_path, rows, mc, skip):
    path = tmp_path / f"fuzz-{abs(hash((str(rows), mc, skip)))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(source=str(path), skip_invalid=skip, **(MC if mc else {}))
    try:
        instances = build_instances(spec, load_splits(spec))
    except ValueError:
        return  # a clear error: unreadable mixed types, a missing column or value, bad answer
    usable = [r for r in rows if not row_problems(r, {"question": "prompt"})]
    assert 1 <= len(instances) <= len(usable)
    for inst in instances:
        assert inst.prompt.startswith("Q: ") and "Q: None" not in inst.prompt
        assert all(isinstance(r, str) and r != "None" for r in inst.references)
        if mc:
            assert 0 <= inst.answer < len(inst.choices)
