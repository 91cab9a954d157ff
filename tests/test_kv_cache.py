from __future__ import annotations

import pytest
import torch

from hf_flexoffload import FlexOffloadCache, Split
from hf_flexoffload.stats import Counters


def make_cache(tmp_path, split):
    return FlexOffloadCache(
        num_layers=4,
        split=split,
        host_attention=True,
        heads=2,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        directory=str(tmp_path),
        counters=Counters(),
    )


def test_units_follow_the_split_and_batch_is_fixed(tmp_path):
    cache = make_cache(tmp_path, Split(device=0.25, host=0.25, disk=0.5))
    cache.allocate((2, 2))
    assert cache.realized_split() == {"device": 0.25, "host": 0.25, "disk": 0.5}
    with pytest.raises(ValueError, match="a cache belongs to one batch"):
        cache.allocate((4,))
    cache.close()


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_append_and_attend_match_plain_attention(tmp_path, tier):
    from hf_flexoffload.layers import attention
    from hf_flexoffload.transfer import Mover

    cache = make_cache(tmp_path, Split(**{tier: 1.0}))
    cache.allocate((3,))
    unit, mover = cache.units[0][0], Mover(torch.device("cpu"), overlap=True)
    ks, vs = [], []
    for _step, s in enumerate((5, 1, 1)):
        q, k, v = (torch.randn(3, s, 2, 4) for _ in range(3))
        ks.append(k)
        vs.append(v)
        out = unit.attend(unit.fetch(), q, k, v, key_mask=None, mover=mover)
        keys = torch.cat(ks, 1).transpose(1, 2)
        values = torch.cat(vs, 1).transpose(1, 2)
        torch.testing.assert_close(out, attention(q.transpose(1, 2), keys, values, None))
    cache.drain()
    assert cache.get_seq_length() == 7
    mover.close()
    cache.close()


@pytest.mark.parametrize(
    "call", ["reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices"]
)
def test_unsupported_operations_raise(tmp_path, call):
    cache = make_cache(tmp_path, Split(device=1.0))
    with pytest.raises(NotImplementedError, match="FlexOffloadCache does not support"):
        getattr(cache, call)(1)
