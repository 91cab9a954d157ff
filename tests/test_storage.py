from __future__ import annotations

import os

import pytest
import torch

from hf_flexoffload.stats import Counters
from hf_flexoffload.storage import DiskFile, TierStore, check_writable, direct_io_supported
from hf_flexoffload.transfer import PAGE, aligned_empty


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


needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="this OS has no O_DIRECT")


def _direct_file(tmp_path, nbytes: int) -> tuple[DiskFile, torch.Tensor]:
    if not direct_io_supported(str(tmp_path)):
        pytest.skip("the test directory's filesystem has no O_DIRECT")
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    path = str(tmp_path / "f.bin")
    DiskFile(path, create=True).write(0, data)
    return DiskFile(path, direct=True), data


@needs_direct
@pytest.mark.parametrize(
    ("offset", "length", "buffer_skip"),
    [
        (0, 8 * PAGE, 0),
        (0, 8 * PAGE + 123, 0),
        (PAGE, 3 * PAGE, 0),
        (100, 3 * PAGE, 0),
        (0, 3 * PAGE, 8),
        (5 * PAGE + 7, 1000, 3),
        (0, (4 << 20) + 3 * PAGE + 5, 0),
        (17, (4 << 20) + PAGE, 0),
    ],
    ids=[
        "aligned",
        "aligned_with_tail",
        "aligned_offset",
        "unaligned_offset",
        "unaligned_buffer",
        "small_unaligned",
        "larger_than_bounce",
        "unaligned_larger_than_bounce",
    ],
)
def test_direct_reads_equal_the_file(tmp_path, offset, length, buffer_skip):
    f, data = _direct_file(tmp_path, 6 << 20)
    assert f.direct
    out = aligned_empty((length + buffer_skip,), torch.uint8)[buffer_skip:]
    assert f.read_into(offset, out) == length
    assert torch.equal(out, data[offset : offset + length])
    f.close()


@needs_direct
def test_direct_read_past_the_end_raises(tmp_path):
    f, _ = _direct_file(tmp_path, 3 * PAGE + 10)
    with pytest.raises(OSError, match="shorter than expected"):
        f.read_into(PAGE, aligned_empty((3 * PAGE,), torch.uint8))
    f.close()


def test_aligned_empty_is_page_aligned():
    for shape, dtype in [
        ((3, 5), torch.float32),
        ((1 << 20,), torch.bfloat16),
        ((7,), torch.uint8),
    ]:
        t = aligned_empty(shape, dtype)
        assert t.data_ptr() % PAGE == 0 and t.shape == shape and t.dtype == dtype
        assert t.is_contiguous()


@needs_direct
def test_store_reads_directly_where_supported(tmp_path):
    if not direct_io_supported(str(tmp_path)):
        pytest.skip("the test directory's filesystem has no O_DIRECT")
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters(), direct_io=True)
    x = torch.randn(300, 77)
    store.put("w", x, "disk")
    assert store.supports_direct_io()
    assert torch.equal(store.get("w"), x)


def test_no_direct_io_falls_back_to_cached_reads(tmp_path, monkeypatch):
    import hf_flexoffload.disk_file as disk_file

    monkeypatch.setattr(disk_file, "_open_direct", lambda path: -1)  # e.g. a filesystem without it
    assert not direct_io_supported(str(tmp_path))
    path = str(tmp_path / "x")
    x = torch.arange(10, dtype=torch.float32)
    DiskFile(path, create=True).write(0, x)
    f = DiskFile(path, direct=True)
    assert not f.direct
    out = torch.empty(10)
    f.read_into(0, out)
    assert torch.equal(out, x)
    f.close()
