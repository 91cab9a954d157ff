import pytest
import torch

from hf_flexoffload.eval import ScenarioSpec
from hf_flexoffload.eval.generation import (
    StopSequences,
    choice_logprobs,
    generate_block,
    truncate_at_stop,
)
from tests.eval.conftest import SCENARIO


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("abc\ndef", ("\n",), "abc"),
        ("abc END x\n", ("\n", "END"), "abc "),
        ("abc", ("\n",), "abc"),
        ("abc", (), "abc"),
    ],
    ids=["newline", "earliest-of-several", "none-found", "no-stops"],
)
def test_truncate_at_stop(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


def test_multi_token_stop_sequence_ends_only_its_row(eval_checkpoint):
    _, _, tok = eval_checkpoint
    ids = tok(["xx", "yy"], return_tensors="pt")["input_ids"]
    criteria = StopSequences(tok, ("END",), prompt_len=2)
    generated = torch.cat([ids, tok(["aEN", "bbb"], return_tensors="pt")["input_ids"]], dim=1)
    assert criteria(generated, None).tolist() == [False, False]  # "EN" is not "END" yet
    generated = torch.cat([generated, tok(["D", "b"], return_tensors="pt")["input_ids"]], dim=1)
    assert criteria(generated, None).tolist() == [True, False]
    prompt_has_stop = tok(["ENDx", "yyyy"], return_tensors="pt")["input_ids"]
    assert not StopSequences(tok, ("END",), prompt_len=4)(prompt_has_stop, None).any()


def test_offloaded_block_equals_stock(eval_checkpoint, offloaded):
    _, stock, tok = eval_checkpoint
    spec = ScenarioSpec(**{**SCENARIO.to_dict(), "stop": ("e", "\n")})
    prompts = ["Rules: X + Y\nTarget:", "Q: why\nTarget:", "Target:"]
    ours = generate_block(offloaded, tok, prompts, spec)
    theirs = generate_block(stock, tok, prompts, spec)
    assert ours == theirs
    completions, prompt_tokens, generated = ours
    assert prompt_tokens == [len(p) for p in prompts]  # one token per character
    for text, n in zip(completions, generated, strict=True):
        assert "e" not in text and "\n" not in text and n == len(text)


def test_choice_logprobs_match_a_direct_computation(eval_checkpoint, offloaded):
    _, stock, tok = eval_checkpoint
    prompts, choices = ["Q: 2+2\nA:", "Q: color?\nA:"], [["4", "22"], ["red", "blue", "x"]]
    ours = choice_logprobs(offloaded, tok, prompts, choices)
    for prompt, options, scores in zip(prompts, choices, ours, strict=True):
        for option, score in zip(options, scores, strict=True):
            ids = tok(prompt + " " + option, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(stock(ids).logits[0, :-1].float(), -1)
            start = len(prompt)  # one token per character
            expected = logp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum()
            assert score == pytest.approx(float(expected), abs=1e-3)
