"""A tiny random OPT that reads and writes ASCII (the character tokenizer), for evaluation."""

from __future__ import annotations

import pytest

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.assets.toy import char_tokenizer
from hf_flexoffload.eval import builtin_scenario
from tests.conftest import build_model, tiny_config

# Two blocks of 4 and one of 2; prompts of about 300 characters (one shot).
SCENARIO = builtin_scenario(
    "synthetic_reasoning:pattern_match", num_shots=1, max_instances=10, max_new_tokens=6
)
POLICY = Policy(micro_batch_size=2, num_micro_batches=2, weights=Split(device=0.5, disk=0.5))


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory):
    """(path, stock model, tokenizer)."""
    tokenizer = char_tokenizer()
    model = build_model(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=512))
    path = tmp_path_factory.mktemp("eval-opt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


@pytest.fixture
def offloaded(eval_checkpoint, tmp_path):
    path, _, _ = eval_checkpoint
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=POLICY, offload_dir=str(tmp_path / "offload")
    ) as model:
        yield model
