"""The contract with transformers' generate: the KV cache it is handed is the one every forward
receives, under whichever name this transformers uses for it.

When a release renames the cache keyword again (as 5.24 did), these tests fail with one clear
message instead of every golden test failing on a shape error.
"""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch
import transformers

from hf_flexoffload import FlexOffloadCache, FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.modeling.cache_keyword import (
    CACHE_KEYWORD,
    CACHE_NAMES,
    cache_argument,
    cache_from_output,
    detect_cache_keyword,
)

from ..conftest import batch
from .test_causal_lm import load

pytestmark = pytest.mark.compat

POLICIES = {
    "all_device": Policy(),
    "offloaded_micro_batches": Policy(
        micro_batch_size=2,
        num_micro_batches=3,
        weights=Split(host=0.5, disk=0.5),
        cache=Split(host=0.5, disk=0.5),
    ),
}


class ForwardSpy:
    """Wraps a model's forward (keeping its signature, which generate inspects) and records the
    cache each call received and that cache's length on arrival."""

    def __init__(self, model: FlexOffloadOPTForCausalLM) -> None:
        self.calls: list[tuple[object, int]] = []
        forward = model.forward

        @functools.wraps(forward)
        def spy(*args, **kwargs):
            cache = cache_argument(kwargs.get("cache"), kwargs.get("past_key_values"))
            self.calls.append((cache, cache.get_seq_length() if cache is not None else -1))
            return forward(*args, **kwargs)

        model.forward = spy


def test_cache_keyword_is_the_field_transformers_outputs_carry():
    fields = transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
    assert detect_cache_keyword() == CACHE_KEYWORD
    assert CACHE_KEYWORD in fields
    assert CACHE_KEYWORD in CACHE_NAMES


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_generate_hands_every_forward_its_planned_cache(pre_ln_checkpoint, policy):
    path, _ = pre_ln_checkpoint
    ids, mask = batch(rows=6)
    new = 5
    with load(path, policy) as model:
        planned = []
        new_cache = model.engine.new_cache

        def record(*args, **kwargs):
            planned.append(new_cache(*args, **kwargs))
            return planned[-1]

        model.engine.new_cache = record
        spy = ForwardSpy(model)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert len(planned) == 1, "generate must plan exactly one cache and no forward another"
    (cache,) = planned
    assert isinstance(cache, FlexOffloadCache) and cache.capacity == ids.shape[1] + new
    received = [c for c, _ in spy.calls]
    assert all(c is cache for c in received), (
        f"forward received {[type(c).__name__ for c in received]} instead of the planned cache: "
        f"transformers {transformers.__version__} passes it under a name forward does not take "
        f"(ours: {CACHE_KEYWORD!r})"
    )
    lengths = [length for _, length in spy.calls]
    assert lengths == [0, *range(ids.shape[1], ids.shape[1] + new - 1)]
    assert cache_from_output(out) is cache
    assert out.sequences.shape[1] == ids.shape[1] + new


def test_generate_logs_and_warns_no_deprecation(pre_ln_checkpoint):
    """A normal run must not announce a break that is on its way: no FutureWarning or
    DeprecationWarning, and no deprecation logged by transformers."""
    path, _ = pre_ln_checkpoint
    ids, mask = batch()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    # transformers logs each deprecation once per process: forget what it already said.
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, load(path, Policy()) as model:
            warnings.simplefilter("always")
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True
            )
            cache_from_output(out)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        hf_logger.removeHandler(handler)
    deprecations = [
        str(w.message)
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    logged = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert deprecations == [] and logged == []


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_generate_rejects_a_cache_of_the_callers(pre_ln_checkpoint, name):
    path, _ = pre_ln_checkpoint
    ids, mask = batch()
    with load(path, Policy()) as model:
        cache = model.engine.new_cache()
        with pytest.raises(ValueError, match=f"{name}=.*manages its own KV cache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, **{name: cache})
        cache.close()


def test_forward_takes_the_cache_under_either_name(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    ids, mask = batch()
    step = torch.full((ids.shape[0], 1), 5)
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    with load(path, Policy()) as model:
        logits = []
        for name in ("cache", "past_key_values"):
            prefill = model(input_ids=ids, attention_mask=mask)
            cache = cache_from_output(prefill)
            out = model(input_ids=step, attention_mask=step_mask, **{name: cache})
            assert cache_from_output(out) is cache and cache.get_seq_length() == ids.shape[1] + 1
            logits.append(out.logits)
            with pytest.raises(ValueError, match="both cache= and past_key_values="):
                model(input_ids=step, cache=cache, past_key_values=cache)
            cache.close()
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    expected = stock(input_ids=torch.cat([ids, step], 1), attention_mask=step_mask).logits[:, -1:]
    torch.testing.assert_close(logits[0], expected, atol=1e-3, rtol=1e-4)
