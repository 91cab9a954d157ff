import json

import pytest

from hf_flexoffload import AutoFlexOffloadModelForCausalLM, cli
from hf_flexoffload.eval import batch_job
from tests.eval.conftest import POLICY


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.json"
    POLICY.save(str(path))
    return str(path)


def _batch(custom_id, prompt, **options):
    body = {"model": "m", "prompt": prompt, **options}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": body})  # fmt: skip


LINES = [
    _batch("req-1", "2+2=", max_tokens=3),
    "{broken",
    _batch("req-2", "The sky is", temperature=9),
    _batch("req-3", "Hello", stop=["\n"]),
    json.dumps({"prompt": "plain"}),
    _batch("req-4", "Longer prompt than the rest, by far"),
    _batch("req-5", "xyz", n=2),
]


def _generate(checkpoint, tmp_path, *extra):
    data = tmp_path / "requests.jsonl"
    if not data.exists():
        data.write_text("\n".join(LINES) + "\n")
    args = ["generate", "--model", checkpoint, "-i", str(data), "-o", str(tmp_path / "out.jsonl"),
            "--no-progress", "--max-tokens", "4"]  # fmt: skip
    return cli.main([*args, *extra])


def test_generate_reports_bad_lines_and_writes_one_result_per_request(
    eval_checkpoint, policy_file, tmp_path, capsys
):
    path, _, _ = eval_checkpoint
    assert _generate(path, tmp_path, "--offload-policy", policy_file) == 0
    captured = capsys.readouterr()
    assert "line 2 (custom_id None): Expecting property name" in captured.err
    assert "line 3 (custom_id 'req-2'): temperature=9" in captured.err
    assert "2 bad line(s) skipped; listed in" in captured.err
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["custom_id"]) for e in errors] == [(2, None), (3, "req-2")]
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["req-1", "req-3", "line-5", "req-4", "req-5"]
    assert len(records[-1]["response"]["body"]["choices"]) == 2
    for r in records:
        usage = r["response"]["body"]["usage"]
        assert usage["completion_tokens"] <= 4 * len(r["response"]["body"]["choices"])
    assert "5 requests (0 from before --resume), 2 bad lines" in captured.out
    assert "policy {" in captured.out and "peak memory: process" in captured.out


def test_ctrl_c_says_how_to_resume_and_resume_finishes(eval_checkpoint, policy_file, tmp_path,
                                                       capsys, monkeypatch):  # fmt: skip
    path, _, _ = eval_checkpoint
    real, calls = batch_job.generate_requests, []

    def interrupt_second_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(batch_job, "generate_requests", interrupt_second_block)
    assert _generate(path, tmp_path, "--offload-policy", policy_file) == cli.EXIT_INTERRUPTED
    assert "interrupted: rerun the same command with --resume" in capsys.readouterr().err
    finished = len((tmp_path / "out.jsonl").read_text().splitlines())
    assert finished == 4  # the first block: 4 rows of the policy's block, of 5 greedy requests
    monkeypatch.setattr(batch_job, "generate_requests", real)
    assert _generate(path, tmp_path, "--offload-policy", policy_file) == cli.EXIT_USAGE
    assert "--resume" in capsys.readouterr().err
    assert _generate(path, tmp_path, "--offload-policy", policy_file, "--resume") == 0
    assert "5 requests (4 from before --resume)" in capsys.readouterr().out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (["{bad", "[]"], [], "no line can run (2 bad lines"),
        (None, ["--temperature", "3"], "--temperature=3.0: must be a number from 0"),
        (None, ["--top-p", "0"], "--top-p=0.0"),
    ],
    ids=["all-bad", "bad-temperature", "bad-top-p"],
)
def test_bad_input_exits_2_before_loading(eval_checkpoint, tmp_path, capsys, monkeypatch,
                                          lines, extra, message):  # fmt: skip
    path, _, _ = eval_checkpoint
    if lines:
        (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(
        AutoFlexOffloadModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    assert _generate(path, tmp_path, *extra) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if lines:
        assert len((tmp_path / "out.errors.jsonl").read_text().splitlines()) == 2


def test_another_job_in_the_output_exits_2_before_loading(eval_checkpoint, policy_file, tmp_path,
                                                          capsys, monkeypatch):  # fmt: skip
    path, _, _ = eval_checkpoint
    assert _generate(path, tmp_path, "--offload-policy", policy_file) == 0
    monkeypatch.setattr(
        AutoFlexOffloadModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    assert _generate(path, tmp_path, "--max-tokens", "5", "--resume") == cli.EXIT_USAGE
    assert "holds a different run: dataset changed" in capsys.readouterr().err


def test_progress_bar_shows_requests_and_tokens_per_second(eval_checkpoint, policy_file,
                                                           tmp_path, capsys):  # fmt: skip
    path, _, _ = eval_checkpoint
    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(LINES) + "\n")
    args = ["generate", "--model", path, "-i", str(data), "-o", str(tmp_path / "out.jsonl"),
            "--offload-policy", policy_file]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "5/5" in err and "tok_s=" in err


def test_a_tokenizer_larger_than_the_model_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    from hf_flexoffload.assets.toy import char_tokenizer
    from tests.conftest import build_model, tiny_config

    build_model(tiny_config(vocab_size=8, max_position_embeddings=512)).save_pretrained(
        tmp_path / "m"
    )
    char_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(
        AutoFlexOffloadModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    assert _generate(str(tmp_path / "m"), tmp_path) == cli.EXIT_USAGE
    assert "the model's vocabulary has 8 entries" in capsys.readouterr().err


def test_a_killed_job_resumes_and_a_running_one_holds_its_output(eval_checkpoint, policy_file,
                                                                 tmp_path, capsys):  # fmt: skip
    import os
    import signal
    import subprocess
    import sys
    import time

    path, _, _ = eval_checkpoint
    data, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(_batch(f"k{i}", "abc" * (1 + i % 5), max_tokens=30) + "\n"
                            for i in range(60)))  # fmt: skip
    args = ["generate", "--model", path, "-i", str(data), "-o", str(out), "--no-progress",
            "--offload-policy", policy_file, "--block-size", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    job = subprocess.Popen([sys.executable, "-m", "hf_flexoffload.cli", *args], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert cli.main([*args, "--resume"]) == cli.EXIT_USAGE  # while it runs
        assert "is in use by a run still going" in capsys.readouterr().err
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    written = out.read_text().count("\n")
    assert 2 <= written < 60
    assert cli.main([*args, "--resume"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [f"k{i}" for i in range(60)]
