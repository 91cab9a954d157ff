"""Blocks, one block's ``generate`` (rows ending on their own) and the output lines."""

import torch

from hf_flexoffload.eval.batch_generation import generate_requests, plan_blocks, result_line
from hf_flexoffload.eval.batch_requests import CHAT, COMPLETIONS, BatchRequest, GenerationOptions
from hf_flexoffload.eval.generation import truncate_at_stop


def _request(custom_id, length, **options):
    return BatchRequest(line=1, custom_id=custom_id, url=COMPLETIONS, prompt_ids=(5,) * length,
                        options=GenerationOptions(**options))  # fmt: skip


def test_blocks_group_alike_options_longest_first():
    requests = [
        _request("short", 2), _request("long", 9), _request("mid", 5), _request("mid2", 5),
        _request("three", 7, n=3), _request("other", 8, max_tokens=3, stop=("a",)),
        _request("seeded", 1, temperature=1.0, seed=1),
        _request("seeded2", 1, temperature=1.0, seed=1),
        _request("greedy-seed", 3, seed=9),
        _request("hot", 4, temperature=0.5, n=2), _request("hot2", 2, temperature=0.5, n=3),
    ]  # fmt: skip
    blocks = [[r.custom_id for r in b] for b in plan_blocks(requests, 4)]
    assert blocks == [
        ["long", "other", "three", "mid"],  # greedy, whatever max_tokens, stop or n
        ["mid2", "greedy-seed", "short"],  # a seed does not matter to greedy decoding
        ["hot"],  # sampled: n rows each, and n is one per call
        ["hot2"],
        ["seeded"],  # a seeded sample runs alone
        ["seeded2"],
    ]
    assert [[r.custom_id for r in b] for b in plan_blocks(requests[:4], 1)] == [
        ["long"], ["mid"], ["mid2"], ["short"]
    ]  # fmt: skip


def test_rows_of_one_block_end_at_their_own_limits_as_generate_alone(eval_checkpoint):
    _, stock, tok = eval_checkpoint
    prompts = ["The cat sat on", "Once", "hello world, this is", "abc"]
    options = [GenerationOptions(max_tokens=3), GenerationOptions(max_tokens=9, stop=("e", "o")),
               GenerationOptions(max_tokens=6, n=2), GenerationOptions(max_tokens=1)]  # fmt: skip
    block = [BatchRequest(line=i, custom_id=str(i), url=COMPLETIONS,
                          prompt_ids=tuple(tok(p)["input_ids"]), options=o)
             for i, (p, o) in enumerate(zip(prompts, options, strict=True))]  # fmt: skip
    assert plan_blocks(block, 4) == [[block[2], block[0], block[1], block[3]]]  # one block
    got = generate_requests(stock, tok, block)
    for request, completions in zip(block, got, strict=True):
        ids = torch.tensor([request.prompt_ids])
        out = stock.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=request.options.max_tokens,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        expected = truncate_at_stop(text, request.options.stop)
        assert [c.text for c in completions] == [expected] * request.options.n
        assert all(c.tokens <= request.options.max_tokens for c in completions)
    assert got[3][0].tokens == 1 and got[3][0].finish_reason in ("length", "stop")


def test_result_lines_are_the_openai_batch_output_format():
    from hf_flexoffload.eval.batch_generation import Completion

    chat = BatchRequest(line=1, custom_id="c", url=CHAT, prompt_ids=(5, 6, 7),
                        options=GenerationOptions(n=2))  # fmt: skip
    line = result_line(chat, [Completion("hi", 2, "stop"), Completion("yo!", 4, "length")], "m")
    assert line["custom_id"] == "c" and line["error"] is None
    assert line["id"].startswith("batch_req_") and line["response"]["status_code"] == 200
    body = line["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "yo!"}, "logprobs": None,
         "finish_reason": "length"},
    ]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    text = result_line(
        BatchRequest(line=2, custom_id="t", url=COMPLETIONS, prompt_ids=(5,),
                     options=GenerationOptions()),
        [Completion("x", 1, "stop")], "m",
    )["response"]["body"]  # fmt: skip
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "x"
