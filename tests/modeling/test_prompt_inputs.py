"""Inputs at the edges behave like stock transformers, or fail clearly before any work: an empty
batch, a zero-length prompt (starts from bos), ``pipeline([""])``, out-of-vocabulary ids."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

from ..conftest import VOCAB

POLICY = Policy(weights=Split(host=0.5, disk=0.5))


@pytest.fixture(scope="module")
def models(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=POLICY) as model:
        yield stock, model


def test_pipeline_with_an_empty_prompt_generates_like_stock(models, tokenizer):
    stock, model = models
    kw = dict(max_new_tokens=4, do_sample=False)
    want = transformers.pipeline("text-generation", model=stock, tokenizer=tokenizer)([""], **kw)
    got = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)([""], **kw)
    assert got == want


def test_zero_length_prompt_starts_from_bos(models):
    stock, model = models
    bos = torch.full((2, 1), stock.generation_config.bos_token_id)
    want = stock.generate(bos, max_new_tokens=3, do_sample=False)
    got = model.generate(torch.zeros((2, 0), dtype=torch.long), max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros((0, 5), dtype=torch.long), "at least one sequence"),
        (torch.tensor([[3, VOCAB, 4]]), f"token id {VOCAB}, outside the model's vocabulary"),
        (torch.tensor([[3, -1, 4]]), "token id -1, outside"),
    ],
    ids=["empty-batch", "beyond-vocab", "negative"],
)
def test_bad_prompts_fail_clearly_before_any_work(models, ids, match, monkeypatch):
    _, model = models
    monkeypatch.setattr(model.engine, "plan_run", lambda *a: pytest.fail("planned a run"))
    with pytest.raises(ValueError, match=match):
        model.generate(ids, max_new_tokens=2)
    if ids.shape[0]:
        monkeypatch.setattr(model.engine, "forward", lambda *a: pytest.fail("ran a forward"))
        with pytest.raises(ValueError, match=match):
            model(ids)
