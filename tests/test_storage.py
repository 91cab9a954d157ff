from __future__ import annotations

import os

import pytest
import torch

from hf_flexoffload.stats import Counters
from hf_flexoffload.storage import TierStore, check_writable


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_put_get_round_trip(tmp_path, tier, dtype):
    counters = Counters()
    store = TierStore(torch.device("cpu"), str(tmp_path), counters)
    x = torch.randn(5, 7).to(dtype)
    store.put("a.weight", x, tier)
    assert torch.equal(store.get("a.weight"), x)
    assert counters.live[tier] == x.numel() * x.element_size()
    if tier == "disk":
        assert store.entry("a.weight").tensor is None, "disk tensors are not kept in RAM"
        assert os.path.getsize(store.entry("a.weight").path) == x.numel() * x.element_size()
        assert counters.moved["disk_to_host"] == x.numel() * x.element_size()
    store.remove("a.weight")
    assert counters.live[tier] == 0


def test_adopt_only_what_the_index_vouches_for(tmp_path):
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    store.open_index({"v": 1})
    store.put("w", x, "disk")
    store.write_index({"v": 1})

    again = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    again.open_index({"v": 1})
    assert again.adopt("w", (3, 4), torch.float32)
    assert torch.equal(again.get("w"), x)
    assert not again.adopt("w", (4, 3), torch.float32), "shape mismatch is not adopted"

    other = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    other.open_index({"v": 2})  # a different source: the old index is dropped
    assert not other.adopt("w", (3, 4), torch.float32)
    assert not os.path.exists(tmp_path / "index.json")


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "new"), 1)
    with pytest.raises(OSError, match="GiB free but the disk tier needs"):
        check_writable(str(tmp_path), 2**62)
