import json

import pytest
from datasets import Dataset, DatasetDict

from hf_flexoffload.eval import ScenarioSpec, build_instances, builtin_scenario
from hf_flexoffload.eval.scenario import continuation

ROWS = [
    {"qid": "a", "question": "2+2", "answer": "4", "options": ["3", "4"], "gold": 1},
    {"qid": "b", "question": "3+3", "answer": "6", "options": ["6", "7"], "gold": 0},
    {"qid": "c", "question": "1+1", "answer": "2", "options": ["2", "5"], "gold": 0},
]


def spec(**kw) -> ScenarioSpec:
    base = dict(source="data.jsonl", prompt_template="Q: {question}\nA:", reference_column="answer")
    return ScenarioSpec(**{**base, **kw})


def splits(rows=ROWS) -> DatasetDict:
    data = Dataset.from_list(rows)
    return DatasetDict({"test": data, "train": data})


def test_prompts_references_and_ids():
    instances = build_instances(spec(id_column="qid", instructions="Add."), splits())
    assert [i.id for i in instances] == ["a", "b", "c"]
    assert instances[0].prompt == "Add.\n\nQ: 2+2\nA:"
    assert instances[1].references == ("6",)


def test_shots_are_deterministic_shared_and_answered():
    first = build_instances(spec(num_shots=2, seed=3), splits())
    again = build_instances(spec(num_shots=2, seed=3), splits())
    assert [i.prompt for i in first] == [i.prompt for i in again]
    shots = {i.prompt.rsplit("Q: ", 1)[0] for i in first}
    assert len(shots) == 1  # the same examples before every instance
    (prefix,) = shots
    assert prefix.count("Q: ") == 2 and prefix.endswith("\n\n")
    assert any(f"Q: {r['question']}\nA: {r['answer']}\n\n" in prefix for r in ROWS)


@pytest.mark.parametrize("answer_column", ["gold", "answer"], ids=["index", "text"])
def test_multiple_choice_answer_by_index_or_text(answer_column):
    mc = spec(choices_column="options", answer_column=answer_column, metrics=("accuracy",))
    instances = build_instances(mc, splits())
    assert [i.answer for i in instances] == [1, 0, 0]
    assert instances[0].choices == ("3", "4")


def test_max_instances_takes_the_first():
    assert len(build_instances(spec(max_instances=2), splits())) == 2


@pytest.mark.parametrize(
    "kwargs, rows, match",
    [
        ({"prompt_template": "Q: {query}"}, ROWS, "no column 'query'"),
        ({"reference_column": "label"}, ROWS, "Column 'label'"),
        ({}, [], "empty"),
        ({"split": "validation"}, ROWS, "split='validation'"),
        (
            {"choices_column": "options", "answer_column": "question", "metrics": ("accuracy",)},
            ROWS,
            "neither an index",
        ),
        ({"id_column": "answer"}, [*ROWS, ROWS[0]], "duplicate ids"),
    ],
    ids=["template-field", "missing-column", "empty", "missing-split", "bad-answer", "dup-ids"],
)
def test_bad_data_is_a_clear_error(kwargs, rows, match):
    data = Dataset.from_list(rows) if rows else Dataset.from_dict({"question": [], "answer": []})
    with pytest.raises(ValueError, match=match):
        build_instances(spec(**kwargs), DatasetDict({"test": data}))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"metrics": ("bleu",)}, "metrics"),
        ({"metrics": ("accuracy",)}, "metrics"),
        ({"num_shots": -1}, "num_shots"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt_template": "no fields"}, "prompt_template"),
        ({"prompt_template": "{unclosed"}, "prompt_template"),
        ({"choices_column": "options"}, "answer_column"),
        ({"stop": ("",)}, "stop"),
    ],
    ids=["unknown-metric", "mc-metric-on-generation", "shots", "tokens", "no-field", "bad-format",
         "mc-without-answer", "empty-stop"],
)  # fmt: skip
def test_invalid_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ScenarioSpec.{field}"):
        spec(**kwargs)


def test_spec_json_round_trip():
    s = builtin_scenario("synthetic_reasoning:induction", max_instances=10)
    assert ScenarioSpec.from_dict(json.loads(s.to_json())) == s
    assert s.name == "synthetic_reasoning-induction" and s.stop == ("\n",)


def test_builtin_has_helm_adaptation():
    instances = build_instances(builtin_scenario("synthetic_reasoning:pattern_match"))
    assert len(instances) == 5000
    prompt = instances[0].prompt
    assert prompt.startswith("Please solve the following problem.\n\n")
    assert prompt.count("Target:") == 6 and prompt.endswith("\nTarget:")


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(ValueError, match="synthetic_reasoning:induction"):
        builtin_scenario("synthetic_reasoning:nope")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_local_dataset_formats(tmp_path, fmt):
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "options"} for r in ROWS])
    path = tmp_path / f"data.{fmt}"
    if fmt in ("jsonl", "json"):
        path.write_text("".join(json.dumps(dict(r)) + "\n" for r in data))
    elif fmt == "csv":
        data.to_csv(str(path))
    elif fmt == "parquet":
        data.to_parquet(str(path))
    else:
        DatasetDict({"test": data}).save_to_disk(str(path))
    instances = build_instances(spec(source=str(path), id_column="qid"))
    assert [i.references for i in instances] == [("4",), ("6",), ("2",)]


def test_missing_dataset_path_says_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="jsonl"):
        build_instances(spec(source=str(tmp_path / "nope.jsonl")))


@pytest.mark.parametrize(
    "prompt, expected", [("A:", " 4"), ("A: ", "4"), ("A:\n", "4")], ids=["space", "ws", "nl"]
)
def test_continuation_spacing(prompt, expected):
    assert continuation(prompt, "4") == expected
