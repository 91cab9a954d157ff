"""Golden tests of what only Llama has: token-for-token equality with stock
``LlamaForCausalLM`` for a KV cache of ``num_key_value_heads`` heads, llama3 rope scaling and
compression over grouped-query attention. The golden tests of every architecture
(placements, forward, bf16, sampling, pipeline) run on Llama's multi-head, grouped-query and
multi-query variants in ``tests/modeling/test_causal_lm.py``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_flexoffload import FlexOffloadLlamaForCausalLM, Policy, QuantConfig, Split
from hf_flexoffload.formats.compression import dequantize, quantize

from ..conftest import batch, build_llama, tiny_llama_config

# Golden tests: `make test-compat` runs them against every supported transformers.
pytestmark = pytest.mark.compat

GREEDY = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)


def load(path: str, policy: Policy | str, **kw) -> FlexOffloadLlamaForCausalLM:
    return FlexOffloadLlamaForCausalLM.from_pretrained(path, offload_policy=policy, **kw)


def assert_same_generation(got, expected, atol: float = 1e-3) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4)


def test_kv_cache_holds_only_the_kv_heads(llama_checkpoint):
    path, stock = llama_checkpoint
    kv_heads = stock.config.num_key_value_heads
    with load(path, Policy(micro_batch_size=2)) as model:
        cache = model.engine.new_cache()
        model(input_ids=torch.randint(3, 90, (3, 5)), cache=cache)
        unit = cache.units[0][0]
        assert unit.token_shape == (2, 2, kv_heads, 16)
        assert model.engine.kv_bytes(3, 5) == 3 * 5 * 3 * 2 * kv_heads * 16 * 4
        cache.close()


def test_llama3_rope_scaling_matches_stock(tmp_path):
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,  # short, so all three frequency bands occur
    )
    stock = build_llama(tiny_llama_config(2, False, rope_parameters=rope))
    stock.save_pretrained(tmp_path)
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, **GREEDY)
    with load(str(tmp_path), Policy(cache=Split(host=0.5, disk=0.5))) as model:
        assert model.engine.arch.rope.rope_type == "llama3"
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    assert_same_generation(got, expected)


def test_unsupported_rope_type_fails_before_loading(tmp_path):
    build_llama(tiny_llama_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = dict(rope_type="mrope", rope_theta=10000.0)  # not ours
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_type='mrope' is not supported.*'default', 'line"):
        load(str(tmp_path), Policy())


@pytest.mark.parametrize(
    "policy",
    [
        # The dequantizing path: exact against stock (the int4 kernel's bf16 rounding is
        # tested in tests/formats/test_int4_tiled.py and tests/storage/test_weights.py).
        Policy(compress_weights=QuantConfig(bits=4, group_size=32), int4_kernel_rows=0),
        Policy(
            micro_batch_size=2,
            compress_weights=QuantConfig(bits=4, group_size=32),
            compress_embeddings=False,
            weights=Split(device=0.2, host=0.3, disk=0.5),
            int4_kernel_rows=0,
        ),
    ],
    ids=["4bit_all_device", "4bit_offloaded_keep_embeddings"],
)
def test_4bit_weights_match_stock_on_simulated_quantized_weights(gqa_checkpoint, policy):
    path, stock = gqa_checkpoint
    reference = copy.deepcopy(stock)
    with torch.no_grad():
        for name, p in reference.named_parameters():  # a tied head is quantized once, shared
            if p.dim() == 2 and (policy.compress_embeddings or "embed_tokens" not in name):
                p.copy_(dequantize(quantize(p, policy.compress_weights)))
    ids, mask = batch()
    expected = reference.generate(ids, attention_mask=mask, **GREEDY)
    with load(path, policy) as model:
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    assert_same_generation(got, expected)
    assert not torch.equal(
        reference.model.layers[0].mlp.up_proj.weight, stock.model.layers[0].mlp.up_proj.weight
    )


@pytest.fixture(scope="module")
def smooth_checkpoint(tmp_path_factory):
    """A grouped-query Llama with weights scaled x4 only: attention stays smooth, so a small
    change of the cached keys makes a small change of the logits (at x32 attention is nearly
    one-hot and any perturbation can flip which token a head reads)."""
    model = build_llama(tiny_llama_config(2, True), scale=4)
    path = tmp_path_factory.mktemp("llama-smooth")
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_4bit_cache_decode_logits_stay_close_to_stock(smooth_checkpoint, tier):
    """Teacher-forced on stock's tokens, so every decode step attends over the same history as
    stock's, only quantized to 4 bits per KV head."""
    path, stock = smooth_checkpoint
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, **GREEDY)
    tokens = expected.sequences[:, ids.shape[1] :]
    policy = Policy(compress_cache=QuantConfig(bits=4, group_size=16), cache=Split(**{tier: 1.0}))
    with load(path, policy) as model:
        cache = model.engine.new_cache()
        steps = [model(input_ids=ids, attention_mask=mask, cache=cache).logits[:, -1]]
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[:, t : t + 1], attention_mask=mask, cache=cache)
            steps.append(out.logits[:, -1])
        cache.close()
    torch.testing.assert_close(steps[0], expected.scores[0], atol=1e-3, rtol=1e-4)  # no history
    for ours, theirs in zip(steps[1:], expected.scores[1:], strict=True):
        assert not torch.equal(ours, theirs)  # the history really was quantized
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min() > 0.99
        assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()


def test_auto_policy_generates_stock_tokens(gqa_checkpoint):
    path, stock = gqa_checkpoint
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with load(path, "auto", max_memory={"host": "2GiB"}) as model:
        assert model.policy_estimate.tokens_per_second > 0
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert model.generation_stats.batch_size == 5
    assert torch.equal(got, expected)
