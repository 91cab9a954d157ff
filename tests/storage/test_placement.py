from __future__ import annotations

import itertools

import pytest

from hf_flexoffload import Split
from hf_flexoffload.storage.placement import TensorSpec, assign_units, place_tensors, segment_bytes

# One OPT-1.3B layer (bf16): the case where FlexGen's whole-tensor rule missed badly.
H, F = 2048, 8192
LAYER = [
    TensorSpec("ln.weight", (H,), 2),
    TensorSpec("q.weight", (H, H), 2),
    TensorSpec("k.weight", (H, H), 2),
    TensorSpec("v.weight", (H, H), 2),
    TensorSpec("out.weight", (H, H), 2),
    TensorSpec("fc1.weight", (F, H), 2),
    TensorSpec("fc2.weight", (H, F), 2),
]


@pytest.mark.parametrize(
    "split",
    [Split(device=0.2, host=0.5, disk=0.3), Split(device=0.05, disk=0.95), Split(host=1.0)],
    ids=["20-50-30", "5-0-95", "all_host"],
)
def test_realized_split_within_half_a_row(split):
    segments = place_tensors(LAYER, split)
    specs = {s.name: s for s in LAYER}
    got = segment_bytes(segments, specs)
    total = sum(s.nbytes for s in LAYER)
    largest_row = max(s.row_bytes for s in LAYER)
    for tier, fraction in zip(("device", "host", "disk"), split.fractions, strict=True):
        assert abs(got[tier] - fraction * total) <= largest_row
    # Every row of every tensor is placed exactly once.
    for spec in LAYER:
        rows = sorted((s.start, s.stop) for s in segments if s.name == spec.name)
        assert rows[0][0] == 0 and rows[-1][1] == spec.rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))


def test_assign_units_fractions():
    tiers = assign_units(20, Split(device=0.25, host=0.25, disk=0.5))
    assert [tiers.count(t) for t in ("device", "host", "disk")] == [5, 5, 10]
    assert assign_units(3, Split(host=1.0)) == ["host"] * 3
