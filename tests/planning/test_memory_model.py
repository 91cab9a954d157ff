"""The memory model: named items that sum to the per-tier terms, and the table the docs show."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import OPTConfig

from hf_flexoffload import Policy, Split, Workload
from hf_flexoffload.architectures import architecture_for
from hf_flexoffload.planning.cost_model import ModelSizes, estimate, realized_fractions
from hf_flexoffload.planning.memory_model import (
    MODEL_ITEMS,
    Footprint,
    footprint,
    memory_items,
    memory_terms,
)

from .test_hardware import make_profile

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "concepts.md")
OPT_483M = architecture_for(
    OPTConfig(
        vocab_size=50272,
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        ffn_dim=4096,
        max_position_embeddings=2048,
    )
)
TEN = Policy(micro_batch_size=4, num_micro_batches=2, weights=Split(device=0.1, disk=0.9))
WORKLOAD = Workload(prompt_len=16, gen_len=4)


def test_docs_table_is_what_the_code_produces():
    fp, _ = footprint(OPT_483M, torch.bfloat16, TEN, WORKLOAD, shared=True)
    with open(DOCS) as f:
        assert fp.table() in f.read()


@pytest.mark.parametrize(
    ("dtype", "storage"),
    [(torch.bfloat16, None), (torch.float32, torch.bfloat16)],
    ids=["bf16", "bf16-stored-fp32-computed"],
)
@pytest.mark.parametrize("shared", [True, False], ids=["cpu", "cuda"])
def test_items_sum_to_the_terms_the_optimizer_uses(dtype, storage, shared):
    sizes = ModelSizes.of(OPT_483M, dtype, TEN, storage)
    values = realized_fractions(OPT_483M, dtype, TEN, storage)
    items = memory_items(sizes, shared, TEN, WORKLOAD, offloaded=True)
    terms = memory_terms(sizes, shared, TEN, WORKLOAD, offloaded=True)
    fp = Footprint.of(items, values, shared)
    for tier, total in fp.per_tier.items():
        assert abs(total - terms[tier].at(values)) <= len(items)  # int rounding per item
    assert ("read buffers" in fp.items) == (not shared)


def test_narrow_storage_halves_disk_and_resident_bytes():
    bf16, _ = footprint(OPT_483M, torch.float32, TEN, WORKLOAD, shared=True, storage=torch.bfloat16)
    fp32, _ = footprint(OPT_483M, torch.float32, TEN, WORKLOAD, shared=True)
    assert bf16.items["weights"]["disk"] * 2 == pytest.approx(fp32.items["weights"]["disk"], 1e-3)
    assert bf16.memory < fp32.memory


def test_estimate_reports_the_items():
    profile = make_profile()
    est = estimate(OPT_483M, torch.bfloat16, profile, WORKLOAD, TEN)
    assert est.memory is not None and est.peak_bytes == est.memory.per_tier
    assert set(MODEL_ITEMS) & set(est.memory.items)
    assert est.to_dict()["memory"]["per_tier"] == est.peak_bytes
