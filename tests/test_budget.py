from __future__ import annotations

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Split
from hf_flexoffload.budget import Capacities, InsufficientMemoryError, heuristic_policy, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("12GiB", 12 * 2**30), ("500MB", 500 * 10**6), (1024, 1024), ("1e3", 1000), ("2 kib", 2048)],
    ids=["gib", "mb", "int", "float", "spaced"],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_shared_memory_counts_device_and_host_together():
    caps = Capacities(device=100, host=100, disk=1000, shared=True)
    caps.check({"device": 60, "host": 40}, "ok")
    with pytest.raises(InsufficientMemoryError, match="device\\+host"):
        caps.check({"device": 60, "host": 60}, "too much")


@pytest.mark.parametrize(
    "weights, expected",
    [(10, Split(device=1.0)), (1000, Split(device=0.05, disk=0.95))],
    ids=["fits", "offloads"],
)
def test_heuristic_policy_on_cpu(weights, expected):
    caps = Capacities(device=100, host=100, disk=10**6, shared=True)
    policy = heuristic_policy(weights, caps, torch.device("cpu"))
    assert policy.weights == expected


def test_auto_policy_loads_and_generates(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    ids = torch.randint(3, 90, (3, 5))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy="auto", max_memory={"device": "300KB"}
    ) as model:
        assert model.offload_policy.weights.disk > 0
        got = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, stock.generate(ids, max_new_tokens=3, do_sample=False))
