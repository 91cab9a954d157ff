"""Golden tests: token-for-token equality with stock transformers for every placement.

The tests that hold for any architecture run on OPT and Llama checkpoints alike
(``model_checkpoint``, by id), the model-level ones (forward, sampling, pipeline) on some of the
other families too; the rest run on OPT. ``tests/architectures/test_llama.py`` has what only
Llama has, ``tests/architectures/test_families.py`` the other families' placements.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.modeling.auto import MODEL_CLASSES

from ..conftest import LLAMA_MODELS, OPT_MODELS, batch, stock_crosses_longrope_switch

# Golden tests: `make test-compat` runs them against every supported transformers.
pytestmark = pytest.mark.compat

PLACEMENTS = {
    "all_device": Policy(),
    "weights_host": Policy(weights=Split(host=1.0)),
    "weights_disk": Policy(weights=Split(disk=1.0)),
    "weights_mixed": Policy(weights=Split(device=0.2, host=0.5, disk=0.3)),
    "weights_disk_direct_io": Policy(weights=Split(host=0.4, disk=0.6), direct_io=True),
    "cache_host_host_attention": Policy(cache=Split(host=1.0), host_attention=True),
    "cache_host_device_attention": Policy(cache=Split(host=1.0), host_attention=False),
    "cache_disk": Policy(cache=Split(disk=1.0)),
    "cache_mixed": Policy(cache=Split(device=0.3, host=0.3, disk=0.4)),
    "activations_host": Policy(activations=Split(host=1.0)),
    "activations_disk": Policy(activations=Split(disk=1.0)),
    "micro_batches_uneven": Policy(micro_batch_size=2, num_micro_batches=3),
    "everything_offloaded_overlap": Policy(
        micro_batch_size=2,
        num_micro_batches=3,
        weights=Split(device=0.1, host=0.4, disk=0.5),
        cache=Split(host=0.5, disk=0.5),
        activations=Split(host=0.5, disk=0.5),
        overlap=True,
    ),
    "everything_offloaded_no_overlap": Policy(
        micro_batch_size=2,
        num_micro_batches=3,
        weights=Split(device=0.1, host=0.4, disk=0.5),
        cache=Split(host=0.5, disk=0.5),
        activations=Split(host=0.5, disk=0.5),
        overlap=False,
    ),
}


def load(path: str, policy: Policy, **kw) -> FlexOffloadOPTForCausalLM:
    return FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy, **kw)


# The 125m-style OPT and SmolLM2's layout (grouped queries, tied embeddings), where a test needs
# one checkpoint per architecture.
ONE_PER_ARCHITECTURE = ["opt-pre_ln", "llama-gqa_tied"]


def load_as(stock, path: str, policy: Policy, **kw):
    """The offloaded model class of ``stock``'s architecture, loaded from ``path``."""
    cls = MODEL_CLASSES[stock.config.model_type]
    assert cls.config_class is None or isinstance(stock.config, cls.config_class)
    return cls.from_pretrained(path, offload_policy=policy, **kw)


@pytest.mark.parametrize("policy", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
@pytest.mark.parametrize("model_checkpoint", OPT_MODELS + LLAMA_MODELS, indirect=True)
def test_greedy_tokens_and_logits_match_stock(model_checkpoint, policy):
    path, stock = model_checkpoint
    ids, mask = batch()
    expected = stock.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with load_as(stock, path, policy) as model:
        got = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "model_checkpoint",
    [
        *OPT_MODELS,
        "llama-gqa_tied",
        "olmo2-post_norm",
        "mistral-window",
        "gpt_neox-sequential",
        "qwen2_moe-shared_expert",
    ],
    indirect=True,
)
def test_forward_logits_and_loss_match_stock(model_checkpoint):
    path, stock = model_checkpoint
    ids, mask = batch(seed=3)
    policy = Policy(micro_batch_size=2, weights=Split(host=0.5, disk=0.5))
    with load_as(stock, path, policy) as model:
        ours = model(input_ids=ids, attention_mask=mask).logits
        # Unpadded rows for the loss: logits at padding positions are not defined.
        loss = model(input_ids=ids[:, 3:], labels=ids[:, 3:], use_cache=False).loss
    theirs = stock(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs.logits[real], atol=1e-3, rtol=1e-4)
    expected_loss = stock(input_ids=ids[:, 3:], labels=ids[:, 3:]).loss
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "model_checkpoint, policy",
    [
        ("opt-pre_ln", Policy(micro_batch_size=2, weights=Split(disk=1.0))),
        ("llama-gqa_tied", Policy(micro_batch_size=2, cache=Split(host=1.0))),
    ],
    ids=ONE_PER_ARCHITECTURE,
    indirect=["model_checkpoint"],
)
def test_attention_mask_none_and_unpadded_batch(model_checkpoint, policy):
    path, stock = model_checkpoint
    ids, _ = batch(pad=False)
    expected = stock.generate(ids, max_new_tokens=6, do_sample=False)
    with load_as(stock, path, policy) as model:
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


# Each architecture's: offloaded weights, and micro-batches with an offloaded cache.
BF16_POLICIES = {
    "opt": {
        "weights_offloaded": Policy(weights=Split(host=0.5, disk=0.5)),
        "micro_batched_disk_cache": Policy(micro_batch_size=2, cache=Split(disk=1.0)),
    },
    "llama": {
        "weights_offloaded": Policy(weights=Split(host=0.5, disk=0.5)),
        "micro_batched_offloaded_cache": Policy(
            micro_batch_size=2, cache=Split(host=0.5, disk=0.5), host_attention=True
        ),
    },
}


@pytest.mark.parametrize(
    "model_checkpoint, policy",
    [
        pytest.param(model, policy, id=f"{model}-{name}")
        for model in [*OPT_MODELS, "llama-gqa_tied"]
        for name, policy in BF16_POLICIES[model.split("-")[0]].items()
    ],
    indirect=["model_checkpoint"],
)
def test_bf16_matches_stock_bf16(model_checkpoint, tmp_path, policy):
    _, stock = model_checkpoint
    stock16 = copy.deepcopy(stock).to(torch.bfloat16)
    stock16.save_pretrained(tmp_path)
    ids, mask = batch()
    expected = stock16.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with load_as(stock16, str(tmp_path), policy) as model:
        assert model.dtype == torch.bfloat16
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "model_checkpoint, extra",
    [
        ("opt-pre_ln", dict(top_p=0.9)),
        ("llama-gqa_tied", {}),
        ("gemma2-softcap", {}),
        # Crosses LongRoPE's switch: the cache is dropped and recomputed, as stock Phi-3 does.
        ("phi3-longrope", dict(top_p=0.9)),
        ("qwen2-window", {}),
        ("olmoe-clip_qkv", {}),
    ],
    ids=[*ONE_PER_ARCHITECTURE, "gemma2-softcap", "phi3-longrope", "qwen2-window", "olmoe"],
    indirect=["model_checkpoint"],
)
def test_seeded_sampling_with_num_return_sequences(model_checkpoint, extra):
    path, stock = model_checkpoint
    ids, mask = batch(rows=3)
    kw = dict(
        attention_mask=mask,
        max_new_tokens=8 if stock_crosses_longrope_switch(stock) else 3,
        do_sample=True,
        temperature=0.9,
        top_k=20,
        **extra,
        repetition_penalty=1.3,
        num_return_sequences=2,
    )
    torch.manual_seed(1234)
    expected = stock.generate(ids, **kw)
    policy = Policy(micro_batch_size=4, cache=Split(host=0.5, disk=0.5))
    with load_as(stock, path, policy) as model:
        torch.manual_seed(1234)
        got = model.generate(ids, **kw)
        assert model.generation_stats.batch_size == 6
    assert torch.equal(got, expected)


class BanToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


def test_user_logits_processor_and_eos_mid_generation(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    ids, mask = batch()
    free = stock.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    # Make the third generated token of row 0 the EOS, so rows stop at different steps.
    eos = int(free[0, ids.shape[1] + 2])
    kw = dict(
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=1,
        logits_processor=LogitsProcessorList([BanToken(5)]),
    )
    expected = stock.generate(ids, **kw)
    with load(path, Policy(micro_batch_size=2, weights=Split(disk=1.0))) as model:
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)
    assert (got[0] == 1).any(), "row 0 should have stopped early and been padded"


def test_stop_strings_and_streamer(pre_ln_checkpoint, tokenizer):
    path, stock = pre_ln_checkpoint
    ids, _ = batch(rows=1, pad=False)
    free = stock.generate(ids, max_new_tokens=8, do_sample=False)
    new = free[0, ids.shape[1] :].tolist()
    stop = tokenizer.decode(new[3])
    stops_after = new.index(new[3]) + 1
    kw = dict(max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    expected = stock.generate(ids, **kw)

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    streamer = Collect()
    with load(path, Policy(weights=Split(host=0.5, disk=0.5))) as model:
        got = model.generate(ids, streamer=streamer, **kw)
    assert torch.equal(got, expected)
    assert got.shape[1] == ids.shape[1] + stops_after
    assert streamer.chunks[-1] is None and len(streamer.chunks) == 1 + stops_after + 1


@pytest.mark.parametrize(
    "model_checkpoint",
    [
        *ONE_PER_ARCHITECTURE,
        "gemma3_text-local_global",
        "gpt_neox-parallel",
        "qwen3-head_dim",
        "qwen3_moe-sparse_step",
    ],
    indirect=True,
)
def test_pipeline_matches_stock_pipeline(model_checkpoint, tokenizer):
    path, stock = model_checkpoint
    prompts = ["Hello there", "offload", "The zig-zag schedule", "a"]
    kw = dict(max_new_tokens=5, do_sample=False, batch_size=3)
    stock_pipe = transformers.pipeline("text-generation", model=stock, tokenizer=tokenizer)
    expected = stock_pipe(prompts, **kw)
    policy = Policy(micro_batch_size=2, weights=Split(host=0.3, disk=0.7))
    with load_as(stock, path, policy) as model:
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
        got = pipe(prompts, **kw)
    assert got == expected


def test_generation_stats(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    ids, mask = batch()
    with load(
        path, Policy(micro_batch_size=2, weights=Split(disk=1.0), cache=Split(disk=1.0))
    ) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        stats = model.generation_stats
        disk_weights = model.placement_report.bytes_per_tier["disk"]
    assert stats.forwards == 4 and stats.generated_tokens == 5 * 4
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0 and stats.tokens_per_second > 0
    # Weights are read once per forward (plus the tied head re-reading the embedding matrix).
    assert stats.bytes_moved["disk_to_host"] >= 4 * disk_weights
    assert stats.bytes_moved["host_to_disk"] > 0 and stats.peak_bytes["disk"] > disk_weights


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "beam search"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
        (dict(cache_implementation="static"), "cache_implementation"),
        (dict(prompt_lookup_num_tokens=3), "prompt lookup"),
    ],
    ids=["beam_search", "no_cache", "attentions", "hidden_states", "static_cache", "lookup"],
)
def test_unsupported_generate_options_raise(pre_ln_checkpoint, kwargs, message):
    path, _ = pre_ln_checkpoint
    ids, mask = batch()
    with load(path, Policy()) as model, pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)


def test_device_and_to(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    with load(path, Policy(weights=Split(disk=1.0))) as model:
        assert model.device == torch.device("cpu")
        assert model.to("cpu") is model and model.to(torch.float32) is model
        with pytest.raises(ValueError, match="Load it again"):
            model.to("meta")
        with pytest.raises(ValueError, match="dtype"):
            model.to(torch.float64)


def test_fp16_checkpoint_computes_in_bf16_on_cpu(pre_ln_checkpoint, tmp_path, caplog):
    _, stock = pre_ln_checkpoint
    copy.deepcopy(stock).to(torch.float16).save_pretrained(tmp_path)
    with (
        caplog.at_level("INFO", logger="hf_flexoffload"),
        load(str(tmp_path), Policy(weights=Split(disk=1.0))) as model,
    ):
        assert model.dtype == torch.bfloat16
        model.generate(torch.randint(3, 90, (2, 4)), max_new_tokens=2)
    assert "bfloat16" in caplog.text
    with load(str(tmp_path), Policy(), dtype=torch.float32) as model:
        # Computed in fp32, stored in the checkpoint's narrower fp16 (converted when used).
        assert model.dtype == torch.float32
        assert model.engine.store.entry("decoder.layers.0.fc1.weight").dtype == torch.float16


def test_direct_io_without_filesystem_support_warns_and_still_matches(
    pre_ln_checkpoint, monkeypatch, caplog
):
    import hf_flexoffload.storage.tier_store as storage

    monkeypatch.setattr(storage, "direct_io_supported", lambda directory: False)
    path, stock = pre_ln_checkpoint
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with (
        caplog.at_level(logging.WARNING),
        load(path, Policy(weights=Split(disk=1.0), direct_io=True)) as model,
    ):
        assert not model.engine.store.direct_io
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert "does not support O_DIRECT" in caplog.text
