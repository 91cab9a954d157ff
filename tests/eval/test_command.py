import json

import pytest

from hf_flexoffload import AutoFlexOffloadModelForCausalLM, cli
from hf_flexoffload.planning.budget import InsufficientMemoryError
from tests.eval.conftest import POLICY


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.json"
    POLICY.save(str(path))
    return str(path)


def _eval(checkpoint: str, output, *extra: str) -> int:
    args = ["eval", "--model", checkpoint, "--output", str(output), "--no-progress"]
    return cli.main([*args, *extra])


def test_eval_dataset_writes_a_run_and_prints_stats(eval_checkpoint, policy_file, tmp_path,
                                                    capsys):  # fmt: skip
    path, _, _ = eval_checkpoint
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                            [("2+2", "4"), ("3+3", "6"), ("1+1", "2")]))  # fmt: skip
    code = _eval(
        path, tmp_path / "runs",
        "--dataset", str(data), "--prompt-template", "Q: {question}\\nA:",
        "--reference-column", "answer", "--metrics", "exact_match,f1,rouge_l",
        "--stop", "\\n", "--max-new-tokens", "5", "--offload-policy", policy_file,
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "qa: 3 instances" in out and "rouge_l" in out and "tok/s" in out
    stats = json.loads((tmp_path / "runs" / "qa" / "stats.json").read_text())
    assert set(stats["metrics"]) == {"exact_match", "f1", "rouge_l"}
    spec = json.loads((tmp_path / "runs" / "qa" / "run_spec.json").read_text())["scenario"]
    assert spec["stop"] == ["\n"] and spec["prompt_template"] == "Q: {question}\nA:"
    for line in (tmp_path / "runs" / "qa" / "instances.jsonl").read_text().splitlines():
        assert "\n" not in json.loads(line)["completion"]


def test_builtin_scenario_and_resume(eval_checkpoint, policy_file, tmp_path, capsys):
    path, _, _ = eval_checkpoint
    args = ["--scenario", "synthetic_reasoning:induction", "--num-shots", "0",
            "--max-instances", "3", "--max-new-tokens", "3",
            "--offload-policy", policy_file]  # fmt: skip
    assert _eval(path, tmp_path / "runs", *args) == 0
    assert _eval(path, tmp_path / "runs", *args) == cli.EXIT_USAGE  # finished: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _eval(path, tmp_path / "runs", *args, "--resume") == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "{data}", "--prompt-template", "{nope}"], "no column 'nope'"),
        (["--dataset", "{data}", "--reference-column", "label"], "--reference-column"),
        (["--dataset", "{missing}"], "does not exist"),
        (["--scenario", "synthetic_reasoning:x"], "built in"),
        (["--dataset", "{data}", "--metrics", "bleu"], "ScenarioSpec.metrics"),
        (["--dataset", "{empty}"], "empty"),
        (["--dataset", "{holes}"], "row 2: 'reference' (reference) is missing or null"),
        (["--dataset", "{holes}"], "row 3: 'input' (prompt) is missing or null"),
    ],
    ids=["template-field", "missing-column", "missing-file", "unknown-scenario", "bad-metric",
         "empty-dataset", "missing-reference", "null-prompt"],
)  # fmt: skip
def test_bad_input_exits_2_before_loading(eval_checkpoint, tmp_path, capsys, monkeypatch,
                                          extra, message):  # fmt: skip
    path, _, _ = eval_checkpoint
    (tmp_path / "d.jsonl").write_text('{"input": "x", "reference": "y"}\n')
    (tmp_path / "e.jsonl").write_text("")
    files = {"data": tmp_path / "d.jsonl", "missing": tmp_path / "no.jsonl"}
    files["empty"] = tmp_path / "e.jsonl"
    files["holes"] = tmp_path / "h.jsonl"
    files["holes"].write_text('{"input": "x", "reference": "y"}\n{"input": "z"}\n'
                              '{"input": null, "reference": "y"}\n')  # fmt: skip
    extra = [str(files.get(a.strip("{}"), a)) for a in extra]
    monkeypatch.setattr(
        AutoFlexOffloadModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    assert _eval(path, tmp_path / "runs", *extra) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_other_run_in_output_exits_2(eval_checkpoint, tmp_path, capsys):
    path, _, _ = eval_checkpoint
    run = tmp_path / "runs" / "synthetic_reasoning-induction"
    run.mkdir(parents=True)
    (run / "run_spec.json").write_text(json.dumps({"scenario": {}, "model": "other"}))
    assert _eval(path, tmp_path / "runs", "--scenario", "synthetic_reasoning:induction") == 2
    assert "different run" in capsys.readouterr().err


def test_skip_invalid_skips_and_counts_rows(eval_checkpoint, policy_file, tmp_path, capsys):
    path, _, _ = eval_checkpoint
    data = tmp_path / "qa.jsonl"
    data.write_text('{"input": "2+2", "reference": "4"}\n{"input": "3+3"}\n'
                    '{"input": "1+1", "reference": "2"}\n')  # fmt: skip
    args = ["--dataset", str(data), "--max-new-tokens", "2", "--offload-policy", policy_file]
    assert _eval(path, tmp_path / "runs", *args, "--skip-invalid") == 0
    assert "2 instances (1 rows skipped for missing data)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "runs" / "qa" / "stats.json").read_text())
    assert stats["num_instances"] == 2 and stats["skipped_invalid_rows"] == 1


@pytest.fixture
def qa(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"input": "2+2", "reference": "4"}\n')
    return str(data)


@pytest.mark.parametrize(
    "raised, code, message",
    [
        (KeyboardInterrupt(), 130, "interrupted: rerun the same command with --resume"),
        (InsufficientMemoryError("block too big"), 3, "block too big"),
    ],
    ids=["ctrl-c", "no-fit"],
)
def test_interrupt_and_no_fit_exit_codes(eval_checkpoint, qa, tmp_path, capsys, monkeypatch,
                                         raised, code, message):  # fmt: skip
    path, _, _ = eval_checkpoint

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(AutoFlexOffloadModelForCausalLM, "from_pretrained", fail)
    assert _eval(path, tmp_path / "runs", "--dataset", qa) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "qa" / ".lock").exists(), "the lock is let go"


def test_tokenizer_larger_than_the_model_exits_2_before_loading(tmp_path, qa, capsys,
                                                                monkeypatch):  # fmt: skip
    from hf_flexoffload.assets.toy import char_tokenizer
    from tests.conftest import build_model, tiny_config

    build_model(tiny_config(vocab_size=8, max_position_embeddings=512)).save_pretrained(
        tmp_path / "m"
    )
    char_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(
        AutoFlexOffloadModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    assert _eval(str(tmp_path / "m"), tmp_path / "runs", "--dataset", qa) == 2
    assert "the model's vocabulary has 8 entries" in capsys.readouterr().err


def test_prompts_beyond_the_models_positions_exit_2(eval_checkpoint, tmp_path, capsys):
    path, _, _ = eval_checkpoint  # 512 positions
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"input": "x" * 600, "reference": "y"}) + "\n")
    assert _eval(path, tmp_path / "runs", "--dataset", str(data)) == 2
    assert "exceeds the model's 512 positions" in capsys.readouterr().err
