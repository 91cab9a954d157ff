from __future__ import annotations

import os
import shutil

import pytest
import torch

from hf_flexoffload.config.counters import Counters
from hf_flexoffload.storage.disk_file import DiskFile, check_writable, direct_io_supported
from hf_flexoffload.storage.tier_store import CheckpointChangedError, TierStore
from hf_flexoffload.storage.transfer import PAGE, PinnedHost, aligned_empty, at_phase

from ..conftest import FakeDriver


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
        (PAGE + 100, 5 * PAGE, 100),
        (100, 30, 100),
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
        "same_phase",
        "same_phase_within_a_page",
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
def test_direct_read_at_the_files_phase_bounces_only_the_edges(tmp_path, monkeypatch):
    # A buffer as far past a page boundary as the file offset: whole blocks land in place.
    f, data = _direct_file(tmp_path, 1 << 20)
    bounced = []
    real = DiskFile._read_bounced
    monkeypatch.setattr(
        DiskFile, "_read_bounced", lambda self, o, v: bounced.append(len(v)) or real(self, o, v)
    )
    offset, length = 3 * PAGE + 200, 10 * PAGE + 50
    out = at_phase(aligned_empty((length + PAGE,), torch.uint8), length, offset % PAGE)
    assert f.read_into(offset, out) == length
    assert torch.equal(out, data[offset : offset + length])
    assert bounced == [PAGE - 200, 250]  # the head to the first boundary, the tail after it
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


def test_borrowed_file_is_read_in_place_never_written_and_checked(tmp_path):
    data = torch.randn(10, 6)
    source = tmp_path / "checkpoint.bin"
    source.write_bytes(b"H" * 24 + data.numpy().tobytes())
    store = TierStore(torch.device("cpu"), str(tmp_path / "store"), Counters())
    os.makedirs(store.directory)
    store.reference("w[4:10]", (6, 6), torch.float32, str(source), 24 + 4 * 24)
    assert torch.equal(store.get("w[4:10]"), data[4:])
    rows = store.read_rows("w[4:10]", [(1, 3)], torch.empty(2, 6))
    assert torch.equal(rows, data[5:7])
    assert store.borrowed_bytes() == 6 * 24 and store.bytes_per_tier()["disk"] == 6 * 24
    (tmp_path / "store" / "stale.bin").write_bytes(b"left by an earlier placement")
    store.prune()
    store.write_index({"v": 1})
    assert sorted(os.listdir(store.directory)) == ["index.json"]  # nothing of its own
    store.check_files()
    with pytest.raises(ValueError, match="shorter than the tensor"):
        store.reference("x", (100, 6), torch.float32, str(source), 0)
    shutil.copy(source, tmp_path / "copy")
    os.replace(tmp_path / "copy", source)  # same bytes, another file (re-downloaded): untrusted
    with pytest.raises(CheckpointChangedError, match=r"checkpoint\.bin changed"):
        store.check_files()
    store.remove("w[4:10]")
    assert source.exists()


def test_no_direct_io_falls_back_to_cached_reads(tmp_path, monkeypatch):
    import hf_flexoffload.storage.disk_file as disk_file

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


def test_host_tier_is_pinned_exactly_and_unpinned_on_removal(tmp_path):
    """Host-tier tensors are page-locked at their own size (not rounded to a power of two), and
    every registration is undone when the entry goes."""
    driver = FakeDriver()
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    store.pinned = PinnedHost(
        torch.device("cpu"), register=driver.register, unregister=driver.unregister
    )
    a = torch.randn(300, 70)
    store.put("a", a, "host")
    store.allocate("b", (5000,), torch.float16, "host").fill_(1)
    store.put("c", torch.randn(4), "device")
    assert torch.equal(store.get("a"), a)
    assert len(driver.live) == 2
    assert sum(driver.live.values()) == sum(-(-n // PAGE) * PAGE for n in (300 * 70 * 4, 10000))
    store.remove("a")
    assert len(driver.live) == 1
    store.release()
    assert driver.live == {}


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_read_ahead_fills_a_ring_of_views_in_order(tmp_path, tier, direct):
    # Four runs through a ring of two buffers: each view is yielded filled with its rows,
    # while the next read is already in flight into the other buffer.
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters(), direct_io=direct)
    x = torch.randn(40, 1024)
    store.put("w", x, tier)
    runs = [(0, 10), (10, 20), (20, 33), (33, 40)]
    ring = [aligned_empty((13 * 1024,), torch.float32) for _ in range(2)]
    views = [ring[i % 2][: (b - a) * 1024].view(b - a, 1024) for i, (a, b) in enumerate(runs)]
    got = [v.clone() for v in store.read_rows_ahead("w", runs, views, depth=2)]
    assert [g.shape[0] for g in got] == [10, 10, 13, 7]
    assert torch.equal(torch.cat(got), x)
    if tier == "disk":
        assert store.counters.moved["disk_to_host"] == x.numel() * 4
    store.release()


def test_read_ahead_stopped_early_leaves_no_read_running(tmp_path):
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    x = torch.randn(64, 256)
    store.put("w", x, "disk")
    runs = [(a, a + 8) for a in range(0, 64, 8)]
    views = [torch.empty(8, 256) for _ in runs]
    reader = store.read_rows_ahead("w", runs, views, depth=4)
    assert torch.equal(next(reader), x[:8])
    reader.close()  # the reads already submitted finish before the file is closed
    assert torch.equal(torch.cat(views[:4]), x[:32])
    store.release()
