"""A run knows what it ran: ``--resume`` refuses a changed model, dataset or tokenizer, naming
what changed, and accepts the same model by another path."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hf_flexoffload import cli
from hf_flexoffload.eval.identity import differences, make_run_spec
from hf_flexoffload.eval.scenario import Instance, ScenarioSpec
from tests.conftest import build_model, tiny_config
from tests.eval.conftest import POLICY

ROWS = [("2+2", "4"), ("3+3", "6"), ("1+1", "2")]


@pytest.fixture
def setup(eval_checkpoint, tmp_path):
    """(copy of the checkpoint, dataset, policy file) under tmp_path."""
    path, _, _ = eval_checkpoint
    model = tmp_path / "model"
    shutil.copytree(path, model)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"input": q, "reference": a}) + "\n" for q, a in ROWS))
    POLICY.save(str(tmp_path / "policy.json"))
    return model, data, tmp_path / "policy.json"


def _eval(model, data, policy, output, *extra) -> int:
    return cli.main(["eval", "--model", str(model), "--dataset", str(data), "--output",
                     str(output), "--max-new-tokens", "2", "--offload-policy", str(policy),
                     "--no-progress", *extra])  # fmt: skip


def test_new_weights_at_the_same_path_are_refused_on_resume(setup, tmp_path, capsys):
    model, data, policy = setup
    assert _eval(model, data, policy, tmp_path / "runs") == 0
    config = tiny_config(vocab_size=json.loads((model / "config.json").read_text())["vocab_size"],
                         max_position_embeddings=512)  # fmt: skip
    build_model(config, seed=7).save_pretrained(model)  # same shape, other weights
    assert _eval(model, data, policy, tmp_path / "runs", "--resume") == cli.EXIT_USAGE
    assert "model.weights changed" in capsys.readouterr().err


def test_edited_dataset_is_refused_on_resume(setup, tmp_path, capsys):
    model, data, policy = setup
    assert _eval(model, data, policy, tmp_path / "runs") == 0
    data.write_text(data.read_text().replace('"6"', '"7"'))
    assert _eval(model, data, policy, tmp_path / "runs", "--resume") == cli.EXIT_USAGE
    assert "dataset changed" in capsys.readouterr().err


def test_same_model_and_dataset_by_another_path_resume(setup, tmp_path, monkeypatch):
    model, data, policy = setup
    monkeypatch.chdir(tmp_path)
    assert _eval("model", "qa.jsonl", policy, "runs") == 0
    assert _eval(os.path.abspath(model), os.path.abspath(data), policy, tmp_path / "runs",
                 "--resume") == 0  # fmt: skip


def test_differences_name_the_sections_and_keys():
    spec = ScenarioSpec(source="d.jsonl")
    one = make_run_spec(spec, "m", instances=[Instance("a", "p", ("r",))])
    two = make_run_spec(
        ScenarioSpec(source="/elsewhere/d.jsonl", max_new_tokens=5), "other",
        instances=[Instance("a", "p", ("r2",))],
    )  # fmt: skip
    assert differences(one, two) == ["scenario.max_new_tokens", "dataset"]
    assert differences(one, {"model_name": "x", "scenario": one["scenario"]}) == []
