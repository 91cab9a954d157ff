"""The batch job against stock transformers' ``generate`` on the same requests."""

import json

import pytest
import torch

from hf_flexoffload.eval.batch_job import JobDirectory, run_batch_job
from hf_flexoffload.eval.batch_requests import (
    CHAT,
    COMPLETIONS,
    GenerationOptions,
    read_requests,
)
from hf_flexoffload.eval.generation import truncate_at_stop
from tests.eval.test_batch_requests import TEMPLATE

WORDS = ["Once", "The cat sat on", "Q: 2+2?\nA:", "hello world, this is long", "x", "abc def"]


@pytest.fixture
def tokenizer(eval_checkpoint):
    tok = eval_checkpoint[2]
    tok.chat_template = TEMPLATE
    return tok


def _requests_file(tmp_path, lines) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _lines():
    out = []
    for i, text in enumerate(WORDS):
        body = {"prompt": text, "max_tokens": 4 + i % 3}
        if i % 2:
            body["stop"] = ["e", "a"]
        out.append({"custom_id": f"r{i}", "method": "POST", "url": COMPLETIONS, "body": body})
    out.append({"custom_id": "chat", "method": "POST", "url": CHAT,
                "body": {"messages": [{"role": "user", "content": "Hi there"}]}})  # fmt: skip
    out.append({"prompt": "plain line", "max_tokens": 5})
    return out


def _stock(model, tokenizer, request, sample=False):
    """What ``model.generate`` gives on the request alone: (texts, token counts)."""
    o = request.options
    ids = torch.tensor([request.prompt_ids])
    kwargs = {"do_sample": False}
    if sample:
        torch.manual_seed(o.seed)
        kwargs = {"do_sample": True, "temperature": o.temperature, "top_p": o.top_p,
                  "top_k": None}  # fmt: skip
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o.max_tokens,
                         num_return_sequences=o.n, pad_token_id=tokenizer.pad_token_id,
                         **kwargs)  # fmt: skip
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1] :]]
    return [truncate_at_stop(t, o.stop) for t in texts]


def _texts(record):
    choices = record["response"]["body"]["choices"]
    return [c["message"]["content"] if "message" in c else c["text"] for c in choices]


def test_greedy_tokens_equal_stock_generate(eval_checkpoint, offloaded, tokenizer, tmp_path):
    _, stock, _ = eval_checkpoint
    requests, bad = read_requests(_requests_file(tmp_path, _lines()), tokenizer,
                                  GenerationOptions(max_tokens=6))  # fmt: skip
    assert bad == []
    blocks = []
    result = run_batch_job(offloaded, tokenizer, requests, str(tmp_path / "out.jsonl"),
                           model_name="tiny", on_block=blocks.append)  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [r.custom_id for r in requests]  # input order
    assert len(blocks) > 1 and sum(b.requests for b in blocks) == len(requests)
    for request, record in zip(requests, records, strict=True):
        assert _texts(record) == _stock(stock, tokenizer, request), request.custom_id
        body = record["response"]["body"]
        assert record["error"] is None and record["response"]["status_code"] == 200
        assert body["model"] == "tiny"
        assert body["object"] == ("chat.completion" if request.url == CHAT else "text_completion")
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(request.prompt_ids)
        assert 0 < usage["completion_tokens"] <= request.options.max_tokens or _texts(record) == [
            ""
        ]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        reason = body["choices"][0]["finish_reason"]
        assert reason == ("length" if usage["completion_tokens"] == request.options.max_tokens
                          and not request.options.stop else reason)  # fmt: skip
    assert result.stats["requests"] == len(requests) and result.errors is None
    stats = json.loads((tmp_path / "out.job" / "stats.json").read_text())
    assert stats["completion_tokens"] == sum(b.tokens for b in blocks)
    assert stats["policy"]["micro_batch_size"] == 2 and stats["peak_rss_bytes"] > 0


def test_seeded_sampling_equals_generate_with_that_seed(eval_checkpoint, offloaded, tokenizer,
                                                         tmp_path):  # fmt: skip
    _, stock, _ = eval_checkpoint
    lines = [{"custom_id": f"s{i}", "prompt": p, "temperature": 0.9, "top_p": 0.95, "seed": 7 + i,
              "n": 2, "max_tokens": 6} for i, p in enumerate(["Once upon", "The cat"])]  # fmt: skip
    requests, _ = read_requests(_requests_file(tmp_path, lines), tokenizer, GenerationOptions())
    run_batch_job(offloaded, tokenizer, requests, str(tmp_path / "out.jsonl"), seed=123)
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for request, record in zip(requests, records, strict=True):
        texts = _texts(record)
        assert len(texts) == 2
        assert texts == _stock(stock, tokenizer, request, sample=True)


def test_interrupted_job_resumes_to_the_same_output(offloaded, tokenizer, tmp_path):
    requests, _ = read_requests(_requests_file(tmp_path, _lines()), tokenizer,
                                GenerationOptions(max_tokens=4))  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    run_batch_job(offloaded, tokenizer, requests, str(whole))
    out = str(tmp_path / "out.jsonl")

    def stop_after_first_block(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch_job(offloaded, tokenizer, requests, out, on_block=stop_after_first_block)
    first = (tmp_path / "out.jsonl").read_text().splitlines()
    assert 0 < len(first) < len(requests)
    assert not (tmp_path / "out.job" / ".lock").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_batch_job(offloaded, tokenizer, requests, out)
    with open(out, "a") as f:  # a kill while writing: a partial last line, dropped on resume
        f.write('{"id": "batch_req_x", "custom_id": "r')
    seen = []
    result = run_batch_job(offloaded, tokenizer, requests, out, resume=True, on_block=seen.append)
    assert sum(b.requests for b in seen) == len(requests) - len(first)
    assert result.stats["resumed_requests"] == len(first)
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in whole.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [r.custom_id for r in requests]
    assert [_texts(r) for r in records] == [_texts(r) for r in expected]


def test_output_of_another_job_or_no_job_is_refused(offloaded, tokenizer, tmp_path):
    lines = _lines()[:2]
    requests, _ = read_requests(
        _requests_file(tmp_path, lines), tokenizer, GenerationOptions(max_tokens=2)
    )
    out = str(tmp_path / "out.jsonl")
    run_batch_job(offloaded, tokenizer, requests, out)
    lines[1]["body"]["prompt"] = "changed"
    changed, _ = read_requests(
        _requests_file(tmp_path, lines), tokenizer, GenerationOptions(max_tokens=2)
    )
    with pytest.raises(ValueError, match="different run: dataset changed"):
        run_batch_job(offloaded, tokenizer, changed, out, resume=True)
    (tmp_path / "mine.jsonl").write_text("something\n")
    with pytest.raises(FileExistsError, match="not written by a batch job"):
        run_batch_job(offloaded, tokenizer, requests, str(tmp_path / "mine.jsonl"))
    assert JobDirectory(out).errors == str(tmp_path / "out.errors.jsonl")


@pytest.mark.parametrize(
    "model_checkpoint", ["llama-gqa_tied", "gemma3_text-local_global", "gpt_neox-parallel"],
    indirect=True,
)  # fmt: skip
def test_other_families_give_generates_tokens(model_checkpoint, tmp_path):
    from hf_flexoffload import AutoFlexOffloadModelForCausalLM
    from tests.conftest import make_tokenizer
    from tests.eval.conftest import POLICY

    path, stock = model_checkpoint
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    lines = [{"custom_id": f"r{i}", "prompt": p, "max_tokens": 3 + i, "stop": ["q"]}
             for i, p in enumerate(["abc", "hello there", "x", "The cat sat"])]  # fmt: skip
    lines.append({"custom_id": "chat", "method": "POST", "url": CHAT, "body": {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}})  # fmt: skip
    requests, bad = read_requests(_requests_file(tmp_path, lines), tok, GenerationOptions())
    assert bad == []
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        path, offload_policy=POLICY, offload_dir=str(tmp_path / "off")
    ) as model:
        run_batch_job(model, tok, requests, str(tmp_path / "out.jsonl"))
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for request, record in zip(requests, records, strict=True):
        assert _texts(record) == _stock(stock, tok, request), request.custom_id
