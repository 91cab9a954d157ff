import json

import pytest

from hf_flexoffload.assets.toy import char_tokenizer
from hf_flexoffload.eval.batch_requests import (
    CHAT,
    COMPLETIONS,
    GenerationOptions,
    read_requests,
)

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _file(tmp_path, *lines) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _batch(custom_id, url, **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_the_three_forms_with_options_over_defaults(tmp_path, chat_tokenizer):
    path = _file(
        tmp_path,
        _batch("a", COMPLETIONS, model="x", prompt="Hi", max_tokens=3, stop="\n", seed=4),
        "",  # blank lines are skipped
        _batch(
            "b",
            CHAT,
            messages=[{"role": "user", "content": "Yo"}],
            temperature=0.5,
            max_completion_tokens=7,
            n=2,
            top_p=0.9,
        ),
        {"prompt": "plain", "max_tokens": 2},
    )
    defaults = GenerationOptions(max_tokens=9, stop=("END",))
    requests, bad = read_requests(path, chat_tokenizer, defaults)
    assert bad == []
    a, b, c = requests
    assert (a.custom_id, a.line, a.url) == ("a", 1, COMPLETIONS)
    assert list(a.prompt_ids) == chat_tokenizer("Hi")["input_ids"]
    assert a.options == GenerationOptions(max_tokens=3, stop=("\n",), seed=4)
    assert (b.custom_id, b.line, b.url) == ("b", 3, CHAT)
    rendered = "user: Yo\nassistant:"
    assert list(b.prompt_ids) == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert b.options == GenerationOptions(max_tokens=7, temperature=0.5, top_p=0.9, n=2,
                                          stop=("END",))  # fmt: skip
    assert (c.custom_id, c.line, c.url) == ("line-4", 4, COMPLETIONS)
    assert c.options.max_tokens == 2 and c.options.stop == ("END",)


def test_bad_lines_are_reported_with_line_and_custom_id(tmp_path, chat_tokenizer):
    plain = char_tokenizer()  # no chat template
    path = _file(
        tmp_path,
        _batch("ok", COMPLETIONS, prompt="fine"),
        "{not json",
        _batch("no-prompt", COMPLETIONS, max_tokens=3),
        _batch("hot", COMPLETIONS, prompt="x", temperature=5),
        _batch("ok", COMPLETIONS, prompt="again"),
        _batch("pen", COMPLETIONS, prompt="x", frequency_penalty=1.0),
        _batch("url", "/v1/embeddings", input="x"),
        {"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}},
        _batch("chat", CHAT, messages=[{"role": "user", "content": "x"}]),
        _batch("long", COMPLETIONS, prompt="x" * 80, max_tokens=5),
        _batch("stops", COMPLETIONS, prompt="x", stop=["a", "b", "c", "d", "e"]),
        _batch("n", COMPLETIONS, prompt="x", n=0),
        [1, 2],
        _batch("lp", COMPLETIONS, prompt="x", logprobs=5, echo=False, stream=None),
    )
    requests, bad = read_requests(path, plain, GenerationOptions(), max_positions=80)
    assert [r.custom_id for r in requests] == ["ok"]
    found = {(b.line, b.custom_id): b.error for b in bad}
    expected = {
        (2, None): "Expecting property name",
        (3, "no-prompt"): "'prompt' is missing",
        (4, "hot"): "temperature=5: must be a number from 0 (greedy) to 2",
        (5, "ok"): "duplicate custom_id 'ok'",
        (6, "pen"): "unsupported option 'frequency_penalty'",
        (7, "url"): "url='/v1/embeddings'",
        (8, None): "'custom_id' is missing",
        (9, "chat"): "the tokenizer has no chat template",
        (10, "long"): "exceed the model's 80 positions",
        (11, "stops"): "at most 4 sequences",
        (12, "n"): "n=0: must be an integer >= 1",
        (13, None): "must be a JSON object",
        (14, "lp"): "logprobs=5: not supported",
    }
    assert set(found) == set(expected)
    for key, message in expected.items():
        assert message in found[key], (key, found[key])


def test_token_id_prompts_and_empty_file(tmp_path):
    tok = char_tokenizer()
    path = _file(tmp_path, _batch("ids", COMPLETIONS, prompt=[5, 6, 7]),
                 _batch("big", COMPLETIONS, prompt=[5, 999]))  # fmt: skip
    requests, bad = read_requests(path, tok, GenerationOptions())
    assert requests[0].prompt_ids == (5, 6, 7)
    assert "outside the tokenizer's 99 tokens" in bad[0].error
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        read_requests(str(tmp_path / "empty.jsonl"), tok, GenerationOptions())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"stop": ("",)}, "stop="),
        ({"n": True}, "n=True"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**kwargs)


def test_a_stop_string_becomes_a_tuple():
    assert GenerationOptions(stop="\n").stop == ("\n",)
    assert GenerationOptions(stop=["a", "b"]).to_dict()["stop"] == ["a", "b"]
