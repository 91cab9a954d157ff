import json

import pytest

from hf_flexoffload.eval import ScenarioSpec, evaluate, runner
from tests.eval.conftest import POLICY, SCENARIO


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_end_to_end_writes_the_run_and_equals_stock(eval_checkpoint, offloaded, tmp_path):
    _, stock, tok = eval_checkpoint
    result = evaluate(offloaded, tok, SCENARIO, output_dir=tmp_path / "runs", progress=False)
    run = tmp_path / "runs" / SCENARIO.name
    assert sorted(p.name for p in run.iterdir()) == [
        "instances.jsonl",
        "run_spec.json",
        "stats.json",
    ]
    lines = (run / "instances.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [f"test-{i}" for i in range(10)]  # scenario order
    assert records == result.records
    for r in records:
        assert set(r["scores"]) == set(SCENARIO.metrics) and r["references"]
    stats = json.loads((run / "stats.json").read_text())
    assert stats["num_instances"] == 10 and stats["policy"] == POLICY.to_dict()
    assert stats["hardware"]["device"] == "cpu" and stats["generated_tokens"] > 0
    for metric, value in stats["metrics"].items():
        assert value == pytest.approx(sum(r["scores"][metric] for r in records) / 10)
    assert json.loads((run / "run_spec.json").read_text())["scenario"] == SCENARIO.to_dict()
    # The golden check: evaluating through offloading gives what stock transformers gives.
    stock_result = evaluate(stock, tok, SCENARIO, block_size=POLICY.block_size, progress=False)
    assert _without_timing(stock_result.records) == _without_timing(records)
    assert stock_result.metrics == result.metrics


def test_interrupt_then_resume_equals_one_clean_run(offloaded, eval_checkpoint, tmp_path,
                                                    monkeypatch):  # fmt: skip
    _, _, tok = eval_checkpoint
    clean = evaluate(offloaded, tok, SCENARIO, output_dir=tmp_path / "clean", progress=False)

    real, calls = runner._score_block, []

    def crash_on_second_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second block runs
        return real(*args)

    monkeypatch.setattr(runner, "_score_block", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        evaluate(offloaded, tok, SCENARIO, output_dir=tmp_path / "runs", progress=False)
    run = tmp_path / "runs" / SCENARIO.name
    kept = (run / "instances.jsonl").read_text().splitlines()
    assert len(kept) == POLICY.block_size  # the finished block, nothing of the one in flight
    assert not (run / "stats.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        evaluate(offloaded, tok, SCENARIO, output_dir=tmp_path / "runs", progress=False)

    monkeypatch.setattr(runner, "_score_block", real)
    resumed = evaluate(
        offloaded, tok, SCENARIO, output_dir=tmp_path / "runs", resume=True, progress=False
    )
    assert _without_timing(resumed.records) == _without_timing(clean.records)
    assert resumed.metrics == clean.metrics
    assert set(kept) <= set((run / "instances.jsonl").read_text().splitlines())  # kept as is


def test_multiple_choice_scores_by_log_likelihood(offloaded, eval_checkpoint, tmp_path):
    _, _, tok = eval_checkpoint
    rows = [
        {"q": f"{a}+{b}", "options": [str(a + b), str(a + b + 1), "no"], "gold": 0}
        for a, b in ((1, 2), (3, 4), (5, 6))
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = ScenarioSpec(
        source=str(path),
        prompt_template="Q: {q}\nA:",
        choices_column="options",
        answer_column="gold",
        metrics=("accuracy",),
    )
    result = evaluate(offloaded, tok, spec, progress=False)
    for r in result.records:
        assert len(r["logprobs"]) == 3 and all(lp < 0 for lp in r["logprobs"])
        best = max(range(3), key=lambda i: r["logprobs"][i])
        assert r["predicted"] == best and r["scores"]["accuracy"] == float(best == 0)
    assert result.metrics["accuracy"] == pytest.approx(
        sum(r["scores"]["accuracy"] for r in result.records) / 3
    )


def test_bad_input_fails_before_generating(offloaded, eval_checkpoint, tmp_path, monkeypatch):
    _, _, tok = eval_checkpoint
    monkeypatch.setattr(runner, "_score_block", lambda *a: pytest.fail("generation started"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "x", "answer": "y"}\n')
    bad = ScenarioSpec(source=str(path), prompt_template="{missing}", reference_column="answer")
    with pytest.raises(ValueError, match="no column 'missing'"):
        evaluate(offloaded, tok, bad, output_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
