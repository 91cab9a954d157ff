"""What to evaluate: a frozen, JSON-round-trip spec, and the instances it expands to.

A scenario is a dataset split plus how to turn a row into a prompt (a template over its
columns, optional instructions and k-shot examples drawn deterministically from a train split)
and how to judge the answer: references for generated answers, or choices for multiple choice,
which are scored by log-likelihood. Built in: HELM's synthetic reasoning family; anything else
is a local dataset (json, jsonl, csv, parquet or a ``datasets.save_to_disk`` directory).
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

from .metrics import ALL_METRICS, CHOICE_METRICS, GENERATION_METRICS
from .rows import InvalidRowsError, row_problems
from .synthetic import MODES, synthetic_reasoning

BUILTIN_PREFIX = "synthetic_reasoning:"
_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True, kw_only=True)
class ScenarioSpec:
    """How to build and score a scenario's instances.

    Args:
        name: A name for the run (default: derived from ``source``).
        source: ``"synthetic_reasoning:<mode>"`` or a path to a local dataset.
        split: The split to evaluate.
        train_split: Where k-shot examples come from.
        prompt_template: ``str.format`` template over the row's columns, e.g.
            ``"Q: {question}\\nA:"``.
        instructions: Text put before the shots and the prompt.
        reference_column: Column with the reference answer (a string or a list of strings).
        choices_column: Column with a list of choices: makes the scenario multiple choice.
        answer_column: Multiple choice: the right choice, as an index or as its text.
        id_column: Column with unique instance ids (default: the row index).
        num_shots: In-context examples put before every prompt (the same ones for all).
        seed: Picks the shots (and seeds synthetic scenarios' generation and sampling).
        stop: Stop sequences: a completion is cut at the first one (any number, any length).
        max_new_tokens: Generation length limit.
        temperature: 0 for greedy decoding, else the sampling temperature.
        metrics: Names from ``ALL_METRICS``; ``accuracy`` for multiple choice.
        max_instances: Evaluate only the first N instances of the split.
        skip_invalid: Skip rows whose prompt columns, reference, choices, answer or id are
            missing or null (default: refuse them, naming the rows; see ``rows``).
    """

    name: str = ""
    source: str
    split: str = "test"
    train_split: str | None = "train"
    prompt_template: str = "{input}"
    instructions: str = ""
    reference_column: str | None = "reference"
    choices_column: str | None = None
    answer_column: str | None = None
    id_column: str | None = None
    num_shots: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 32
    temperature: float = 0.0
    metrics: tuple[str, ...] = ("exact_match", "quasi_exact_match", "f1")
    max_instances: int | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.name:
            base = self.source.rstrip("/").split("/")[-1].replace(":", "-")
            object.__setattr__(self, "name", os.path.splitext(base)[0] or "scenario")

        def bad(field: str, allowed: str) -> ValueError:
            value = getattr(self, field)
            return ValueError(f"Invalid ScenarioSpec.{field}={value!r}: {allowed}.")

        if not self.source:
            raise bad("source", f"give '{BUILTIN_PREFIX}<mode>' or a dataset path")
        if not isinstance(self.num_shots, int) or self.num_shots < 0:
            raise bad("num_shots", "must be an integer >= 0")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 is greedy)")
        if self.max_instances is not None and self.max_instances < 1:
            raise bad("max_instances", "must be >= 1 or None for all")
        if not self.metrics:
            raise bad("metrics", f"name at least one of {ALL_METRICS}")
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise bad("metrics", f"unknown {unknown}; choose from {ALL_METRICS}")
        if any(not s for s in self.stop):
            raise bad("stop", "stop sequences must be non-empty strings")
        if self.multiple_choice:
            if self.answer_column is None:
                raise bad("answer_column", "a multiple-choice scenario needs the right answer")
            if set(self.metrics) - set(CHOICE_METRICS):
                raise bad("metrics", f"multiple choice is scored by {CHOICE_METRICS}")
        else:
            if self.reference_column is None:
                raise bad("reference_column", "a generation scenario needs references")
            if set(self.metrics) - set(GENERATION_METRICS):
                raise bad("metrics", f"generation is scored by {tuple(GENERATION_METRICS)}")
        if self.num_shots and self.train_split is None:
            raise bad("train_split", "k-shot examples need a train split")
        try:
            fields_used = _template_fields(self.prompt_template)
        except ValueError as e:
            raise bad("prompt_template", f"not a valid format string ({e})") from None
        if not fields_used:
            raise bad("prompt_template", "must name at least one column, like '{question}'")

    @property
    def multiple_choice(self) -> bool:
        return self.choices_column is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"], out["metrics"] = list(self.stop), list(self.metrics)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown ScenarioSpec fields {sorted(unknown)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def builtin_scenario(name: str, **overrides: Any) -> ScenarioSpec:
    """HELM's adaptation of a synthetic reasoning task: instructions, 5 shots, answers after
    ``Target:``, stop at a newline, up to 50 new tokens, exact-match family and F1.

    Example:
        >>> builtin_scenario("synthetic_reasoning:pattern_match", max_instances=100)
    """
    mode = name.removeprefix(BUILTIN_PREFIX)
    if not name.startswith(BUILTIN_PREFIX) or mode not in MODES:
        choices = ", ".join(BUILTIN_PREFIX + m for m in MODES)
        raise ValueError(f"Unknown scenario {name!r}; built in: {choices}.")
    base = dict(
        name=f"synthetic_reasoning-{mode}",
        source=name,
        split="test",
        train_split="train",
        instructions="Please solve the following problem.",
        prompt_template="{input}\nTarget:",
        num_shots=5,
        seed=42,
        stop=("\n",),
        max_new_tokens=50,
        metrics=("exact_match", "quasi_exact_match", "prefix_exact_match", "f1"),
    )
    return ScenarioSpec(**{**base, **overrides})


@dataclass(frozen=True)
class Instance:
    """One thing to answer.

    Attributes:
        id: Unique within the scenario.
        prompt: The full prompt: instructions, shots and this instance's question.
        references: Right answers (generation).
        choices: The options (multiple choice), in order.
        answer: Index of the right choice (multiple choice).
    """

    id: str
    prompt: str
    references: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    answer: int | None = None


def load_splits(spec: ScenarioSpec) -> DatasetDict:
    """The scenario's data: generated (built in) or read from a local path."""
    from datasets import DatasetDict, load_dataset, load_from_disk  # heavy: when data is read

    if spec.source.startswith(BUILTIN_PREFIX):
        return synthetic_reasoning(spec.source.removeprefix(BUILTIN_PREFIX), seed=spec.seed)
    path = spec.source
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Dataset {path!r} does not exist. Give a json, jsonl, csv or parquet file, a "
            f"directory saved with datasets' save_to_disk, or a built-in "
            f"'{BUILTIN_PREFIX}<mode>' ({', '.join(MODES)})."
        )
    if os.path.isdir(path):
        data = load_from_disk(path)
        return data if isinstance(data, DatasetDict) else DatasetDict({spec.split: data})
    fmt = _FILE_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(
            f"Cannot read {path!r}: use one of {sorted(_FILE_FORMATS)} or a saved dataset "
            "directory."
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"Dataset file {path!r} is empty: nothing to evaluate.")
    try:
        data = load_dataset(fmt, data_files=path, split="train")
    except Exception as err:  # datasets' parsers raise many types; name the file instead
        raise ValueError(f"Could not read {path!r} as {fmt}: {err}") from err
    # A single file is the evaluated split (shots need train_split set to the same name).
    return DatasetDict({spec.split: data})


def build_instances(
    spec: ScenarioSpec, splits: DatasetDict | None = None, skipped: list[int] | None = None
) -> list[Instance]:
    """Check the data against ``spec`` and expand every row into an ``Instance``.

    Args:
        skipped: With ``spec.skip_invalid``, the numbers (from 1) of the rows skipped for
            missing data are appended here.

    Raises:
        ValueError: A missing split or column, an empty dataset, a template naming an unknown
            column, a row missing data (``InvalidRowsError``), an answer that is not one of
            the choices, or duplicate ids.
    """
    splits = load_splits(spec) if splits is None else splits
    data = _split(splits, spec.split, "split")
    if len(data) == 0:
        raise ValueError(f"Split {spec.split!r} of {spec.source!r} is empty: nothing to evaluate.")
    _check_columns(spec, data)
    shots = ""
    if spec.num_shots:
        train_name = spec.train_split or spec.split
        train = _split(splits, train_name, "train_split")
        _check_columns(spec, train)
        shots = _shots(spec, train, _valid_rows(spec, train, train_name))
    if spec.max_instances is not None:
        data = data.select(range(min(spec.max_instances, len(data))))
    valid = _valid_rows(spec, data, spec.split)
    if skipped is not None:
        skipped.extend(i + 1 for i in range(len(data)) if i not in valid)
    instances = []
    for i, row in enumerate(data):
        if i not in valid:
            continue
        prompt = shots + spec.prompt_template.format(**row)
        if spec.instructions:
            prompt = f"{spec.instructions}\n\n{prompt}"
        ident = str(row[spec.id_column]) if spec.id_column else f"{spec.split}-{i}"
        if spec.multiple_choice:
            choices = tuple(str(c) for c in row[spec.choices_column])
            answer = _answer_index(spec, row, choices)
            instances.append(Instance(ident, prompt, choices=choices, answer=answer))
        else:
            instances.append(Instance(ident, prompt, references=_references(row, spec)))
    if not instances:
        raise ValueError(f"Every row of split {spec.split!r} lacks data: nothing to evaluate.")
    ids = [inst.id for inst in instances]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"Column {spec.id_column!r} has duplicate ids: instance ids must be unique."
        )
    return instances


def continuation(prompt: str, answer: str) -> str:
    """How an answer follows its prompt: after one space unless the prompt ends in whitespace."""
    return answer if not prompt or prompt[-1].isspace() else f" {answer}"


# -- helpers -----------------------------------------------------------------------------------


def _template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def _split(splits: DatasetDict, name: str, field: str) -> Dataset:
    if name not in splits:
        raise ValueError(
            f"ScenarioSpec.{field}={name!r} is not in the dataset; it has {sorted(splits)}."
        )
    return splits[name]


def _check_columns(spec: ScenarioSpec, data: Dataset) -> None:
    columns = set(data.column_names)
    for field in _template_fields(spec.prompt_template):
        if field not in columns:
            raise ValueError(
                f"The prompt template names {{{field}}}, but the dataset has no column "
                f"{field!r}; its columns are {sorted(columns)}."
            )
    needed = ("choices_column", "answer_column") if spec.multiple_choice else ("reference_column",)
    for attr in (*needed, "id_column"):
        column = getattr(spec, attr)
        if column is not None and column not in columns:
            flag = "--" + attr.replace("_", "-")
            raise ValueError(
                f"Column {column!r} ({flag}) is not in the dataset; its columns are "
                f"{sorted(columns)}."
            )


def _references(row: dict, spec: ScenarioSpec) -> tuple[str, ...]:
    value = row[spec.reference_column]
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else (str(value),)


def _answer_index(spec: ScenarioSpec, row: dict, choices: tuple[str, ...]) -> int:
    answer = row[spec.answer_column]
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if str(answer) in choices:
        return choices.index(str(answer))
    raise ValueError(
        f"Answer {answer!r} (column {spec.answer_column!r}) is neither an index into nor one of "
        f"the choices {list(choices)}."
    )


def _valid_rows(spec: ScenarioSpec, data: Dataset, split: str) -> set[int]:
    """Indices of the rows holding everything ``spec`` needs; raises ``InvalidRowsError``
    naming the others unless ``spec.skip_invalid``."""
    needed = {f: "prompt" for f in sorted(_template_fields(spec.prompt_template))}
    if spec.multiple_choice:
        needed.update({spec.choices_column: "choices", spec.answer_column: "answer"})
    else:
        needed[spec.reference_column] = "reference"
    if spec.id_column:
        needed[spec.id_column] = "id"
    bad = [(i + 1, p) for i, row in enumerate(data) if (p := row_problems(row, needed))]
    if bad and not spec.skip_invalid:
        raise InvalidRowsError(f"split {split!r} of {spec.source!r}", bad)
    invalid = {n - 1 for n, _ in bad}
    return {i for i in range(len(data)) if i not in invalid}


def _shots(spec: ScenarioSpec, train: Dataset, valid: set[int]) -> str:
    """The in-context examples, drawn once with ``spec.seed`` from the valid rows and shared
    by every instance."""
    rng = random.Random(spec.seed)
    pool = sorted(valid)
    picked = [pool[i] for i in rng.sample(range(len(pool)), min(spec.num_shots, len(pool)))]
    parts = []
    for i in picked:
        row = train[i]
        prompt = spec.prompt_template.format(**row)
        if spec.multiple_choice:
            choices = tuple(str(c) for c in row[spec.choices_column])
            answer = choices[_answer_index(spec, row, choices)]
        else:
            answer = _references(row, spec)[0]
        parts.append(prompt + continuation(prompt, answer))
    return "".join(part + "\n\n" for part in parts)
