"""``--model flexoffload`` in lm-evaluation-harness, against ``--model hf`` on the same local
tasks and checkpoint (skipped without lm-eval: ``pip install hf_flexoffload[lm-eval]``)."""

import json

import pytest

from hf_flexoffload import cli

pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'hf_flexoffload[lm-eval]'")

QUESTIONS = [("2+2=", ["4", "5", "22"], 0), ("The cat", [" sat", " dog", "!"], 1),
             ("abc", ["d", "e"], 0), ("Hi", [" there", " you", " all"], 2)]  # fmt: skip
MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["9"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def tasks(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))  # fmt: skip
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    (folder / "tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    return str(folder)


def _samples(output, task):
    files = sorted(output.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"no samples of {task} under {output}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def test_flexoffload_gives_the_results_of_hf(eval_checkpoint, tasks, tmp_path, capsys):
    from tests.eval.conftest import POLICY

    path, _, _ = eval_checkpoint
    policy = tmp_path / "policy.json"
    POLICY.save(str(policy))
    common = ["--tasks", "tiny_mc,tiny_gen", "--include_path", tasks, "--log_samples",
              "--device", "cpu"]  # fmt: skip
    ours = ["lm-eval", "--model", "flexoffload", "--model_args",
            f"pretrained={path},offload_policy={policy},offload_dir={tmp_path / 'off'},"
            "max_memory=host=4GiB", "--output_path", str(tmp_path / "ours"), *common]  # fmt: skip
    assert cli.main(ours) == 0
    stock = ["lm-eval", "--model", "hf", "--model_args", f"pretrained={path}",
             "--batch_size", "4", "--output_path", str(tmp_path / "hf"), *common]  # fmt: skip
    assert cli.main(stock) == 0
    results = [json.loads(sorted(d.rglob("results_*.json"))[-1].read_text())
               for d in (tmp_path / "ours", tmp_path / "hf")]  # fmt: skip
    assert results[0]["config"]["model"] == "flexoffload" and results[1]["config"]["model"] == "hf"
    for task in ("tiny_mc", "tiny_gen"):
        assert results[0]["results"][task] == results[1]["results"][task]
    for task, field in (("tiny_mc", "resps"), ("tiny_gen", "filtered_resps")):
        got, expected = _samples(tmp_path / "ours", task), _samples(tmp_path / "hf", task)
        assert len(got) == len(QUESTIONS)
        for a, b in zip(got, expected, strict=True):
            if task == "tiny_mc":  # log-likelihoods, to float rounding
                assert [float(x[0][0]) for x in a[field]] == pytest.approx(
                    [float(x[0][0]) for x in b[field]], abs=1e-4
                )
            else:  # generated text, exactly
                assert a[field] == b[field]


def test_the_model_type_is_registered_and_batches_by_the_policy(eval_checkpoint, tmp_path):
    from lm_eval.api.registry import get_model

    from hf_flexoffload.eval.lm_eval_model import FlexOffloadLM, parse_max_memory
    from tests.eval.conftest import POLICY

    assert get_model("flexoffload") is FlexOffloadLM
    POLICY.save(str(tmp_path / "p.json"))
    lm = FlexOffloadLM(pretrained=eval_checkpoint[0], offload_policy=str(tmp_path / "p.json"))
    assert lm.batch_size == POLICY.block_size
    args = f"pretrained={eval_checkpoint[0]},offload_policy={tmp_path / 'p.json'}"
    for extra, config, expected in [("", {"batch_size": 1}, POLICY.block_size),  # the CLI's 1
                                    ("", {"batch_size": 3}, 3),
                                    (",batch_size=1", {"batch_size": 3}, 1)]:  # fmt: skip
        lm = FlexOffloadLM.create_from_arg_string(args + extra, {**config, "device": None})
        assert lm.batch_size == expected, (extra, config)
    assert parse_max_memory("host=8GiB;disk=1TB") == {"host": "8GiB", "disk": "1TB"}
    with pytest.raises(ValueError, match="TIER=SIZE"):
        parse_max_memory("8GiB")
