"""Architectures: the registry, Llama's sizes and weight names (on SmolLM2-135M's shape), and its
building blocks against transformers' own modules, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, OPTConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hf_flexoffload import Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures import LlamaShape, OPTShape, Rope, architecture_for
from hf_flexoffload.architectures.layers import attention
from hf_flexoffload.architectures.norms import rms_norm
from hf_flexoffload.planning.cost_model import ModelSizes, estimate
from hf_flexoffload.planning.optimizer import optimize
from hf_flexoffload.storage.kv_codec import TokenCodec
from hf_flexoffload.storage.weight_layout import layout_for

from ..planning.test_hardware import make_profile

# SmolLM2-135M-Instruct's config.
SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def test_registry_dispatches_on_model_type():
    assert isinstance(architecture_for(OPTConfig()), OPTShape)
    assert isinstance(architecture_for(SMOLLM2), LlamaShape)
    with pytest.raises(ValueError, match=r"'gpt2' model.*supported model types: 'opt', 'llama'"):
        architecture_for(GPT2Config())


def test_smollm2_shape():
    arch = architecture_for(SMOLLM2)
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert arch.tied_head and arch.rope == Rope(dim=64, theta=100000.0)
    tensors = arch.stage_tensors()
    assert len(tensors) == 32
    layer = dict(tensors[1])
    assert layer["self_attn.q_proj.weight"] == (576, 576)
    assert layer["self_attn.k_proj.weight"] == layer["self_attn.v_proj.weight"] == (192, 576)
    assert layer["mlp.down_proj.weight"] == (576, 1536)
    assert not any(name.endswith(".bias") for stage in tensors for name, _ in stage)
    assert tensors[-1] == [("norm.weight", (576,))]  # the tied head has no matrix of its own
    assert arch.head_aliases() == {"lm_head.weight": (0, "embed_tokens.weight")}
    layouts = layout_for(arch, Policy(), torch.bfloat16)
    assert layouts[0].local == {"embed_tokens.weight": "embed_tokens.weight"}
    assert "layers.29.mlp.up_proj.weight" in layouts[30].local
    assert layouts[-1].aliases == {"lm_head.weight": "embed_tokens.weight"}


def test_untied_llama_has_its_own_head():
    arch = architecture_for(LlamaConfig(**{**SMOLLM2.to_dict(), "tie_word_embeddings": False}))
    assert arch.stage_tensors()[-1][-1] == ("lm_head.weight", (49152, 576))
    assert arch.checkpoint_name(31, "lm_head.weight") == "lm_head.weight"
    assert arch.head_aliases() == {}


def test_cost_model_counts_llama_bytes_and_flops():
    arch = architecture_for(SMOLLM2)
    h, kv, f = 576, 3 * 64, 1536
    sizes = ModelSizes.of(arch, torch.bfloat16, Policy())
    assert sizes.layer_flops == 2 * (2 * h * h + 2 * h * kv + 3 * h * f)
    assert sizes.layer_plain == (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) * 2
    assert sizes.kv_token == sizes.kv_token_plain == 2 * kv * 2  # keys and values of 3 heads
    assert sizes.weights_stored == (sizes.layer_plain * 30 + 49152 * h * 2 + h * 2)  # tied once
    packed = ModelSizes.of(arch, torch.bfloat16, Policy(compress_cache=QuantConfig()))
    assert packed.kv_token == 2 * kv * (4 + 2 * 16 / 32) / 8  # codes + scale, min per 32


def test_auto_policy_plans_smollm2():
    arch = architecture_for(SMOLLM2)
    ram = 250 * 2**20  # less than SmolLM2's 270 MB of bf16 weights
    profile = make_profile(device_memory=ram, host_memory=ram, ram_available=ram)
    policy, est = optimize(arch, torch.bfloat16, profile, Workload(prompt_len=64, gen_len=16))
    assert est.tokens_per_second > 0
    assert policy.weights.disk > 0
    again = estimate(arch, torch.bfloat16, profile, Workload(prompt_len=64, gen_len=16), policy)
    assert again.peak_bytes["disk"] > 0


# -- building blocks against transformers --------------------------------------------------------


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_cos_sin_match_transformers(rope, dtype):
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_parameters=rope
    )
    arch = architecture_for(config)
    positions = torch.tensor([[0, 1, 2, 3, 100, 255], [-1, 0, 5, 63, 64, 200]])
    x = torch.zeros(1, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)  # (b, s, d)
    ours_cos, ours_sin = arch.rope.cos_sin(positions, dtype)  # (b, s, 1, d)
    assert torch.equal(ours_cos[:, :, 0], cos) and torch.equal(ours_sin[:, :, 0], sin)


def test_rotary_frequencies_are_built_once_per_device():
    """Every layer of every step asks for them: built once per device, not per call (on CUDA a
    per-call build is a host-to-device copy each time)."""
    rope = Rope(dim=16, theta=1e4)
    first = rope.inv_freq(torch.device("cpu"))
    assert rope.inv_freq(torch.device("cpu")) is first
    assert rope.inv_freq(torch.device("cpu"), span=10**6) is first, "default rope: one length"
    assert rope == Rope(dim=16, theta=1e4), "the cache is not part of the value"
    assert torch.equal(first, 1.0 / (1e4 ** (torch.arange(0, 16, 2).float() / 16)))


def test_rotary_angles_build_the_frequencies_once_per_device(monkeypatch):
    """Repeated layers and steps reuse one frequency tensor per device (a ``meta`` device stands
    in for a second one) and get the same angles as the first call."""
    builds = []
    build = Rope._build_inv_freq
    monkeypatch.setattr(
        Rope, "_build_inv_freq", lambda self, d, v: builds.append(d) or build(self, d, v)
    )
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_parameters=LLAMA3_ROPE,
    )
    rope = architecture_for(config).rope
    positions = torch.tensor([[0, 5, 255]])
    first = rope.cos_sin(positions, torch.float32)
    for _ in range(3):
        again = rope.cos_sin(positions, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    meta = rope.inv_freq(torch.device("meta"))
    assert rope.inv_freq(torch.device("meta")) is meta and meta.device.type == "meta"
    assert builds == [torch.device("cpu"), torch.device("meta")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["default", "llama3"])
def test_rotary_on_cuda_matches_transformers_without_syncing(rope):
    cuda = torch.device("cuda", 0)
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_parameters=rope
    )
    arch = architecture_for(config)
    positions = torch.tensor([[0, 1, 2, 3, 100, 255]], device=cuda)
    cos, sin = LlamaRotaryEmbedding(config).to(cuda)(torch.zeros(1, device=cuda), positions)
    arch.rope.cos_sin(positions, torch.float32)  # the first call builds the frequencies
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours_cos, ours_sin = arch.rope.cos_sin(positions, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(ours_cos[:, :, 0], cos) and torch.equal(ours_sin[:, :, 0], sin)


def test_unsupported_rope_types_are_refused():
    config = LlamaConfig(rope_parameters=dict(rope_type="default", rope_theta=1e4))
    config.rope_parameters["rope_type"] = "mrope"  # a type transformers has, we do not
    with pytest.raises(ValueError, match="rope_type='mrope' is not supported"):
        architecture_for(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_matches_transformers(dtype):
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64) * 10).to(dtype)
    assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))


def _reference_attention(q, k, v, key_mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s, total = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * scale  # (b, H, s, S)
    allowed = (
        torch.ones(s, total, dtype=torch.bool).tril(total - s) & key_mask.bool()[:, None, None]
    )
    scores = scores.masked_fill(~allowed, torch.finfo(q.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (b, s, H, d)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("new", [1, 6], ids=["decode", "prefill"])
def test_grouped_query_attention_matches_repeated_heads(kv_heads, new):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, new, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, 9, 8, generator=g) for _ in range(2))
    key_mask = torch.ones(2, 9)
    key_mask[1, :3] = 0  # left padding
    out = attention(q, k, v, key_mask, scale=8**-0.5)
    expected = _reference_attention(q, k, v, key_mask, 8**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- the KV cache codec: quantization groups per KV head ----------------------------------------


@pytest.mark.parametrize("group_size", [8, 16, 64], ids=["g8", "g16", "g64_wider_than_head"])
def test_cache_quantization_groups_never_straddle_kv_heads(group_size):
    batch, kv_heads, head_dim = 2, 3, 16
    codec = TokenCodec(
        (2, batch, kv_heads, head_dim), torch.float32, QuantConfig(bits=4, group_size=group_size)
    )
    tokens = torch.randn(5, 2, batch, kv_heads, head_dim)  # (s, 2, b, H_kv, d)
    tokens[:, :, :, 1] = 0.25  # a constant head: exact only if no group reaches into a neighbour
    tokens[:, :, :, 2] *= 1000  # a wide head: would swamp a shared group's scale
    decoded = codec.decode(codec.encode(tokens))
    assert torch.equal(decoded[:, :, :, 1], tokens[:, :, :, 1])
    # Each head is quantized on its own: changing one head changes no other head's codes.
    changed = tokens.clone()
    changed[:, :, :, 2] = -changed[:, :, :, 2]
    again = codec.decode(codec.encode(changed))
    assert torch.equal(again[:, :, :, :2], decoded[:, :, :, :2])
    # One (scale, min) pair per group within a head: ceil(d / group) groups per KV head.
    groups = math.ceil(head_dim / group_size)
    pairs = 2 * batch * kv_heads * groups
    assert codec.record_bytes == 2 * pairs * 4 + pairs * group_size // 2


def test_cache_split_realizes_over_kv_units_for_gqa(tmp_path):
    from hf_flexoffload import FlexOffloadCache
    from hf_flexoffload.config.counters import Counters

    cache = FlexOffloadCache(
        num_layers=2,
        split=Split(host=0.5, disk=0.5),
        host_attention=True,
        heads=1,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        directory=str(tmp_path),
        counters=Counters(),
    )
    cache.allocate((2,))
    assert [row[0].token_shape for row in cache.units] == [(2, 2, 1, 8)] * 2
    cache.close()


# -- the families' building blocks against transformers -----------------------------------------


def _norm_modules():
    from torch import nn
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    return {
        "rms": (LlamaRMSNorm(64, eps=1e-5), 1e-5),
        "rms_fp32": (Olmo2RMSNorm(64, eps=1e-5), 1e-5),
        "rms_offset": (Gemma2RMSNorm(64, eps=1e-6), 1e-6),
        "rms_offset_gemma3": (Gemma3RMSNorm(64, eps=1e-6), 1e-6),
        "layer": (nn.LayerNorm(64, eps=1e-5), 1e-5),
    }


@pytest.mark.parametrize("kind", ["rms", "rms_fp32", "rms_offset", "rms_offset_gemma3", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norms_match_transformers(kind, dtype):
    from hf_flexoffload.architectures.norms import norm

    module, eps = _norm_modules()[kind]
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(64))
    module = module.to(dtype)
    x = (torch.randn(3, 5, 64) * 10).to(dtype)
    ours = norm(kind.removesuffix("_gemma3"), x, module.weight, getattr(module, "bias", None), eps)
    assert ours.dtype == dtype
    assert torch.equal(ours, module(x))


def _windowed_reference(q, k, v, key_mask, scale, window, softcap=None):
    """Attention over keys in position order, masked by causality, window and padding."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s, total = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * scale  # (b, H, s, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    queries = torch.arange(total - s, total)[:, None]
    keys = torch.arange(total)[None, :]
    allowed = (keys <= queries) & (keys > queries - window) & key_mask.bool()[:, None, None]
    scores = scores.masked_fill(~allowed, torch.finfo(q.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (b, s, H, d)


@pytest.mark.parametrize("new", [1, 5], ids=["decode", "several_new"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_sliding_window_attention_over_a_ring_matches_keys_in_order(new, softcap):
    """Keys held in a ring (rotated, the oldest overwritten) attend as the same keys in order."""
    g = torch.Generator().manual_seed(1)
    length, window = 11, 4
    q = torch.randn(2, 4, new, 8, generator=g)
    k, v = (torch.randn(2, 2, length, 8, generator=g) for _ in range(2))
    key_mask = torch.ones(2, length)
    key_mask[1, :2] = 0
    expected = _windowed_reference(q, k, v, key_mask, 8**-0.5, window, softcap)
    in_order = attention(q, k, v, key_mask, 8**-0.5, window=window, softcap=softcap)
    torch.testing.assert_close(in_order, expected, atol=1e-5, rtol=1e-5)
    # The ring: the history's last `window` positions at row t % window, then the new keys.
    history = length - new
    kept = [t for t in range(history) if t >= history - window]
    rows = sorted(kept, key=lambda t: t % window)
    slots = torch.tensor(rows + list(range(history, length)))
    ring = attention(
        q, k[:, :, slots], v[:, :, slots], key_mask, 8**-0.5,
        window=window, softcap=softcap, key_slots=slots, length=length,
    )  # fmt: skip
    torch.testing.assert_close(ring, expected, atol=1e-5, rtol=1e-5)


ROPES = {
    "linear": dict(rope_type="linear", rope_theta=1e4, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=32),
    "dynamic": dict(rope_type="dynamic", rope_theta=1e4, factor=2.0),
}


@pytest.mark.parametrize("rope", list(ROPES.values()), ids=list(ROPES))
@pytest.mark.parametrize("length", [20, 200], ids=["within", "beyond_max_positions"])
def test_scaled_rotary_types_match_transformers(rope, length):
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=64, rope_parameters=rope
    )
    arch = architecture_for(config)
    positions = torch.arange(length)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)  # fresh: no history
    ours_cos, ours_sin = arch.rope.cos_sin(positions, torch.float32, span=length)
    assert torch.equal(ours_cos[:, :, 0], cos) and torch.equal(ours_sin[:, :, 0], sin)


@pytest.mark.parametrize("length", [8, 30], ids=["short_factors", "long_factors"])
@pytest.mark.parametrize("partial", [1.0, 0.5], ids=["whole_heads", "partial"])
def test_longrope_switches_factors_with_the_forwards_length(length, partial):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=1e4,
            short_factor=[1.0, 1.5, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0][: int(8 * partial)],
            long_factor=[2.0, 4.0, 8.0, 16.0, 2.0, 2.0, 2.0, 2.0][: int(8 * partial)],
            original_max_position_embeddings=16,
            partial_rotary_factor=partial,
        ),
    )
    arch = architecture_for(config)
    positions = torch.arange(length)[None]
    cos, sin = Phi3RotaryEmbedding(config)(torch.zeros(1), positions)
    ours_cos, ours_sin = arch.rope.cos_sin(positions, torch.float32, span=length)
    assert arch.rope.dim == 16 * partial
    assert torch.equal(ours_cos[:, :, 0], cos) and torch.equal(ours_sin[:, :, 0], sin)
