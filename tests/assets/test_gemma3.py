"""Gemma 3 270M real weights (``gemma3_text``): the converted checkpoint, and the offloaded model
generating stock's tokens, with prompts longer than its 512-position sliding window."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM

from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split

pytestmark = pytest.mark.real_weights

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    # Longer than the 512-position window: the local layers' rings wrap during prefill.
    "Count with me: " + ", ".join(str(i) for i in range(1, 260)) + ",",
]


@pytest.fixture(scope="module")
def stock(gemma3_path):
    tokenizer = AutoTokenizer.from_pretrained(gemma3_path, padding_side="left")
    model = Gemma3ForCausalLM.from_pretrained(gemma3_path, dtype=torch.float32).eval()
    return tokenizer, model


def test_checkpoint_is_an_ordinary_gemma3_text_checkpoint(gemma3_path):
    config = AutoConfig.from_pretrained(gemma3_path)
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.sliding_window) == (18, 640, 512)
    assert config.layer_types.count("full_attention") == 3
    assert getattr(config, "quantization_config", None) is None


def test_offloaded_generation_matches_stock(gemma3_path, stock):
    tokenizer, model = stock
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > 512
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = model.generate(**batch, **kw)
    policy = Policy(micro_batch_size=2, weights=Split(host=0.5, disk=0.5), cache=Split(host=1.0))
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        gemma3_path, offload_policy=policy
    ) as ours:
        got = ours.generate(**batch, **kw)
        windows = ours.engine.arch.kv_windows
    assert windows.count(512) == 15 and windows.count(None) == 3
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-4)
    text = tokenizer.decode(got.sequences[0, batch["input_ids"].shape[1] :])
    assert text.strip(), "real weights say something"
