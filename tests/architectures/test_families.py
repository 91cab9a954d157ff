"""Golden tests of the rotary decoder families (Qwen2/3, Mistral, Gemma 2/3, Phi-3, OLMo 2,
GPT-NeoX, and Llama's scaled rotary types) against stock transformers on the same checkpoint:
greedy tokens and scores with left padding, in placements chosen so that every mechanism runs
for every family (weights and KV cache on every tier, micro-batches, overlap, host attention),
plus ``.bin`` checkpoints, windows shorter than the sequence, and the refusals.

Sampling, ``pipeline`` and forward logits for families run in ``tests/modeling``.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures import architecture_for
from hf_flexoffload.formats import int4_tiled
from hf_flexoffload.formats.compression import dequantize, quantize

from ..conftest import (
    FAMILY_MODELS,
    WINDOW,
    batch,
    build_by_id,
    family_config,
    save_torch_bin,
    stock_crosses_longrope_switch,
)

# Golden tests: `make test-compat` runs them against every supported transformers.
pytestmark = pytest.mark.compat

GREEDY = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
PLACEMENTS = {
    "all_device": Policy(),
    "weights_and_cache_on_disk": Policy(
        weights=Split(disk=1.0), cache=Split(disk=1.0), direct_io=True
    ),
    "everything_spread_micro_batches": Policy(
        micro_batch_size=2,
        num_micro_batches=3,
        weights=Split(device=0.2, host=0.4, disk=0.4),
        cache=Split(device=0.3, host=0.3, disk=0.4),
        activations=Split(host=0.5, disk=0.5),
        overlap=True,
        host_attention=True,
    ),
}


def greedy(stock) -> dict:
    """``GREEDY``, stopping before LongRoPE's switch where stock Phi-3 loses the context."""
    return GREEDY if stock_crosses_longrope_switch(stock) else {**GREEDY, "max_new_tokens": 3}


def load(path: str, policy: Policy, **kw):
    return AutoFlexOffloadModelForCausalLM.from_pretrained(path, offload_policy=policy, **kw)


def assert_same_generation(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("policy", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
@pytest.mark.parametrize("model_checkpoint", FAMILY_MODELS, indirect=True)
def test_greedy_tokens_and_scores_match_stock(model_checkpoint, policy):
    path, stock = model_checkpoint
    if stock.config.rope_parameters.get("rope_type") == "dynamic":
        # Stock's dynamic rotary keeps state between calls (transformers 5.0 even keeps the
        # last call's grown frequencies for the next short one): compare with a fresh model.
        stock = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, **greedy(stock))
    with load(path, policy) as model:
        assert type(model).supported_model_type == stock.config.model_type
        got = model.generate(ids, attention_mask=mask, **greedy(stock))
    assert_same_generation(got, expected)


@pytest.mark.parametrize(
    "name", ["qwen2-window", "gemma2-softcap", "phi3-longrope", "gpt_neox-parallel"]
)
def test_bin_checkpoints_load_like_safetensors(name, tmp_path):
    stock = build_by_id(name)
    save_torch_bin(stock, tmp_path, shards=2)
    ids, mask = batch(seed=4)
    expected = stock.generate(ids, attention_mask=mask, **greedy(stock))
    with load(str(tmp_path), Policy(weights=Split(host=0.5, disk=0.5))) as model:
        got = model.generate(ids, attention_mask=mask, **greedy(stock))
    assert_same_generation(got, expected)


@pytest.mark.parametrize(
    "model_checkpoint", ["mistral-window", "gemma3_text-local_global"], indirect=True
)
@pytest.mark.parametrize("tier", ["device", "disk"])
def test_windowed_layers_hold_only_their_window(model_checkpoint, tier):
    """A sliding-window layer's KV unit is a ring of its window, in memory or on disk, while a
    global layer's grows with the sequence; the memory model counts the same."""
    path, _ = model_checkpoint
    with load(path, Policy(cache=Split(**{tier: 1.0}))) as model:
        arch = model.engine.arch
        cache = model.engine.new_cache()
        ids = torch.randint(3, 90, (2, 11))  # longer than any window
        model(input_ids=ids, cache=cache)
        for _ in range(3):
            model(input_ids=torch.randint(3, 90, (2, 1)), cache=cache)
        total = 14
        for unit, window in zip((row[0] for row in cache.units), arch.kv_windows, strict=True):
            assert unit.length == total
            held = total if window is None else window
            assert unit.stored == held
            if tier == "disk":
                assert os.path.getsize(unit._path) == held * unit.token_bytes
            elif window is not None:
                assert unit._buffer.shape[0] == window
        assert model.engine.kv_bytes(2, total) == 2 * arch.kv_positions(total) * (
            2 * arch.kv_heads * arch.head_dim * 4
        )
        assert arch.kv_positions(total) < arch.layers * total
        cache.close()


@pytest.mark.parametrize("model_checkpoint", ["gemma3_text-local_global"], indirect=True)
def test_windowed_forward_logits_match_stock_past_the_window(model_checkpoint):
    path, stock = model_checkpoint
    ids, mask = batch(seed=5, length=13)  # prompts three windows long, left-padded
    policy = Policy(micro_batch_size=2, cache=Split(host=0.5, disk=0.5))
    with load(path, policy) as model:
        ours = model(input_ids=ids, attention_mask=mask).logits
    theirs = stock(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-3, rtol=1e-4)


# bf16 differs from stock by the rounding of attention kernels (as for Llama): tokens are equal
# where no greedy choice is within that rounding, which holds for these two checkpoints.
@pytest.mark.parametrize(
    "model_checkpoint", ["olmo2-post_norm", "gemma2-softcap", "mixtral-top2"], indirect=True
)
def test_bf16_matches_stock_bf16(model_checkpoint, tmp_path):
    _, stock = model_checkpoint
    stock16 = copy.deepcopy(stock).to(torch.bfloat16)
    stock16.save_pretrained(tmp_path)
    ids, mask = batch()
    expected = stock16.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    policy = Policy(micro_batch_size=2, weights=Split(host=0.5, disk=0.5), cache=Split(host=1.0))
    with load(str(tmp_path), policy) as model:
        assert model.dtype == torch.bfloat16
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


Q4 = QuantConfig(bits=4, group_size=32, rounding="minmax")


def simulated(stock):
    """Stock with its decoder matrices quantized and dequantized by the same functions."""
    model = copy.deepcopy(stock)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(e in name for e in ("embed", "lm_head", "mlp.gate.", "shared_expert_gate")):
                continue  # embeddings, head and routers stay exact
            if p.dim() == 2:
                p.copy_(dequantize(quantize(p, Q4)))
            elif p.dim() == 3:  # experts stored as (E, out, in): each expert's matrix
                gate_up = "gate_up_proj" in name
                for e in range(p.shape[0]):
                    # transformers fuses [gate; up]: each half is one checkpoint matrix.
                    halves = p[e].chunk(2) if gate_up else (p[e],)
                    for m in halves:
                        m.copy_(dequantize(quantize(m.contiguous(), Q4)))
    return model


@pytest.mark.parametrize(
    "model_checkpoint",
    [
        "mistral-window",
        "gpt_neox-parallel",
        "phi3-window",
        "mixtral-top2",
        "qwen2_moe-shared_expert",
    ],
    indirect=True,
)
def test_compressed_weights_match_stock_on_the_same_quantized_weights(model_checkpoint):
    """4-bit decoder matrices (fused projections included) on the dequantizing path: exactly
    stock with the same quantized-then-dequantized matrices."""
    path, stock = model_checkpoint
    ids, mask = batch()
    expected = simulated(stock).generate(ids, attention_mask=mask, **GREEDY)
    policy = Policy(compress_weights=Q4, weights=Split(host=0.5, disk=0.5), int4_kernel_rows=0)
    with load(path, policy) as model:
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    assert_same_generation(got, expected)


@pytest.mark.parametrize("model_checkpoint", ["qwen3-head_dim"], indirect=True)
def test_int4_kernel_path_agrees_to_bf16_precision(model_checkpoint):
    """The CPU int4 kernel multiplies the same 4-bit bytes in bf16: the first step's scores
    agree with the simulated reference to bf16 precision (as for OPT in test_weights)."""
    if not int4_tiled.kernel_available(torch.device("cpu")):
        pytest.skip("this torch has no CPU int4 kernel")
    path, stock = model_checkpoint
    ids, mask = batch()
    expected = simulated(stock).generate(ids, attention_mask=mask, **GREEDY)
    policy = Policy(compress_weights=Q4, weights=Split(host=0.5, disk=0.5), int4_kernel_rows=4096)
    with load(path, policy) as model:
        assert model.engine.fetcher.kernel_rows == 4096
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    atol = 0.02 * expected.scores[0].abs().max().item()
    torch.testing.assert_close(got.scores[0], expected.scores[0], atol=atol, rtol=0)


@pytest.mark.parametrize("model_checkpoint", ["gemma2-softcap", "qwen2-window"], indirect=True)
def test_compressed_cache_in_windowed_layers(model_checkpoint):
    """A 4-bit KV cache in ring buffers on every tier: prefill attends the new tokens at full
    precision (stock's first token, exactly), and decoding runs on the rounded history."""
    path, stock = model_checkpoint
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, **GREEDY)
    policy = Policy(
        micro_batch_size=2,
        cache=Split(device=0.3, host=0.3, disk=0.4),
        compress_cache=QuantConfig(bits=4, group_size=16),
    )
    with load(path, policy) as model:
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    torch.testing.assert_close(got.scores[0], expected.scores[0], atol=1e-3, rtol=1e-4)
    assert torch.equal(
        got.sequences[:, : ids.shape[1] + 1], expected.sequences[:, : ids.shape[1] + 1]
    )
    assert all(torch.isfinite(score).all() for score in got.scores)


def test_every_family_names_its_checkpoint_tensors(tmp_path):
    """The layout names every tensor stock's ``save_pretrained`` writes, and nothing else
    (mixture-of-experts models hold their experts fused in memory but save them one by one)."""
    from safetensors import safe_open

    for name in FAMILY_MODELS:
        stock = build_by_id(name)
        arch = architecture_for(stock.config)
        names = {
            arch.checkpoint_name(stage, local)
            for stage, tensors in enumerate(arch.stage_tensors())
            for local, _ in tensors
        }
        stock.save_pretrained(tmp_path / name)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as saved:
            written = set(saved.keys())
        renamed = arch.renamed_tensors()
        expected = {renamed.get(k, k).removeprefix("model.") for k in written}
        if arch.tied_head:
            expected.discard("lm_head.weight")
        assert names == expected, name


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        (
            "gemma3_text-local_global",
            dict(attn_logit_softcapping=10.0),
            "attn_logit_softcapping set is not supported",
        ),
        (
            "gemma3_text-local_global",
            dict(use_bidirectional_attention=True),
            "use_bidirectional_attention=True is not causal",
        ),
        ("mistral-window", dict(layer_types=["chunked_attention"] * 3), "layer_types"),
    ],
    ids=["gemma3_attn_softcap", "bidirectional", "unknown_layer_type"],
)
def test_unsupported_options_are_refused_before_loading(name, overrides, message, tmp_path):
    config = family_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        architecture_for(config)


def test_window_is_shorter_than_the_tests_sequences():
    assert WINDOW < 7 + 8


@pytest.mark.parametrize("model_checkpoint", ["mistral-window"], indirect=True)
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_forwards_of_several_tokens_through_the_ring_match_one_forward(model_checkpoint, tier):
    """Steps of several new tokens each wrap the ring mid-step (new keys overwrite rows the
    step's earlier queries still see): logits equal stock's single forward over it all."""
    path, stock = model_checkpoint
    ids = torch.randint(3, 90, (2, 15), generator=torch.Generator().manual_seed(7))
    theirs = stock(input_ids=ids).logits
    policy = Policy(cache=Split(**{tier: 1.0}), host_attention=tier != "device")
    with load(path, policy) as model:
        cache = model.engine.new_cache()
        ours = []
        for start, stop in ((0, 6), (6, 11), (11, 12), (12, 15)):
            ours.append(model(input_ids=ids[:, start:stop], cache=cache).logits)
        cache.close()
    torch.testing.assert_close(torch.cat(ours, dim=1), theirs, atol=1e-3, rtol=1e-4)


def test_memory_and_cost_models_count_only_the_windows():
    from hf_flexoffload.planning.model_sizes import ModelSizes

    arch = architecture_for(family_config("gemma3_text-local_global"))
    sizes = ModelSizes.of(arch, torch.float32, Policy())
    assert arch.kv_windows == (WINDOW, WINDOW, None)
    assert sizes.kv_positions(100) == arch.kv_positions(100) == 2 * WINDOW + 100
    assert sizes.kv_positions(3) == 3 * 3  # shorter than the window: every position
    dense = ModelSizes.of(
        architecture_for(family_config("olmo2-post_norm")), torch.float32, Policy()
    )
    assert dense.kv_positions(100) == 3 * 100


@pytest.mark.parametrize(
    "model_checkpoint", ["gemma3_text-local_global", "qwen3_moe-sparse_step"], indirect=True
)
def test_auto_policy_and_dtype_plan_a_family(model_checkpoint, tmp_path, monkeypatch):
    """``offload_policy="auto"`` and ``dtype="auto"`` price a windowed family and a mixture of
    experts from (seeded) profiles, and the chosen policy generates stock's tokens."""
    from ..planning.test_hardware import seed_profile

    path, stock = model_checkpoint
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(cache))
    for dtype, rate in ((torch.float32, 100e9), (torch.bfloat16, 10e9)):  # fp32 is faster here
        rates = {"1": rate / 10, "16": rate / 2, "256": rate}
        seed_profile(cache, tempfile.gettempdir(), (64, 128), dtype, matmul_flops=rates)
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, **GREEDY)
    workload = Workload(prompt_len=7, gen_len=8, batch_size=5)
    with load(path, "auto", dtype="auto", workload=workload) as model:
        assert model.dtype == torch.float32
        assert model.policy_estimate.tokens_per_second > 0
        got = model.generate(ids, attention_mask=mask, **GREEDY)
    assert_same_generation(got, expected)
