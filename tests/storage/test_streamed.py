"""Streamed embedding/LM-head matrices: exact rows and chunked projections, from any tier."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_flexoffload.config.counters import Counters
from hf_flexoffload.storage.streamed import ChunkBuffers, StreamedMatrix, _runs, chunk_rows
from hf_flexoffload.storage.tier_store import TierStore
from hf_flexoffload.storage.transfer import PinnedHost

CPU = torch.device("cpu")


def streamed(
    tmp_path,
    matrix: torch.Tensor,
    storage: torch.dtype,
    rows_per_chunk: int,
    device: torch.device = CPU,
):
    """``matrix`` stored in ``storage`` as three row segments: device, host, disk."""
    counters = Counters()
    store = TierStore(device, str(tmp_path), counters)
    n = matrix.shape[0]
    cuts = [(0, n // 5, "device"), (n // 5, n // 2, "host"), (n // 2, n, "disk")]
    parts = []
    for start, stop, tier in cuts:
        key = f"m[{start}:{stop}]"
        store.put(key, matrix[start:stop].to(storage), tier)
        parts.append((key, start, stop))
    return StreamedMatrix(
        parts=parts,
        store=store,
        shape=tuple(matrix.shape),
        dtype=matrix.dtype,
        rows_per_chunk=rows_per_chunk,
        buffers=ChunkBuffers(device, counters),
    ), counters


@pytest.mark.parametrize(
    ("compute", "storage"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["same-dtype", "bf16-stored-fp32-computed"],
)
def test_lookup_and_projection_equal_the_whole_matrix(tmp_path, compute, storage):
    torch.manual_seed(0)
    whole = torch.randn(301, 24).to(storage).to(compute)  # exactly representable in storage
    matrix, counters = streamed(tmp_path, whole, storage, rows_per_chunk=37)
    ids = torch.tensor([[300, 0, 150, 151, 152], [7, 7, 299, 60, 151]])
    assert torch.equal(matrix.take(ids), F.embedding(ids, whole))
    x = torch.randn(2, 3, 24, dtype=compute)
    torch.testing.assert_close(matrix.linear(x), F.linear(x, whole), rtol=0, atol=1e-5)
    # A lookup reads only its rows from disk: 4 distinct rows there, in 3 runs (299-300, 151-152,
    # 150 joins 151-152).
    counters.moved["disk_to_host"] = 0
    matrix.take(torch.tensor([150, 151, 152, 299, 300]))
    assert counters.moved["disk_to_host"] == 5 * 24 * storage.itemsize


def test_chunk_buffers_are_bounded_and_reused(tmp_path):
    whole = torch.randn(1000, 16)
    matrix, counters = streamed(tmp_path, whole, torch.bfloat16, rows_per_chunk=64)
    before = counters.live["device"]
    for _ in range(3):
        matrix.linear(torch.randn(4, 16))
    grown = counters.live["device"] - before
    assert 0 < grown <= 64 * 16 * (2 + 4)  # one bf16 read chunk + one fp32 converted chunk


def test_runs_and_chunk_rows():
    assert _runs([1, 2, 3, 7, 9, 10]) == [(1, 4), (7, 8), (9, 11)]
    assert chunk_rows(rows=10, row_bytes=4, budget=0) == 10  # at most every row
    assert chunk_rows(rows=10**6, row_bytes=2**12, budget=2**22) == 2**10


def test_chunk_staging_is_reused_counted_and_released():
    """Disk chunks bound for a CUDA device pass through a two-buffer pinned ring: no allocation
    per chunk, counted as host memory while held, released with the buffers."""
    from ..conftest import FakeDriver

    driver = FakeDriver()
    counters = Counters()
    cpu = torch.device("cpu")
    pinned = PinnedHost(cpu, register=driver.register, unregister=driver.unregister)
    buffers = ChunkBuffers(cpu, counters, pinned)
    seen = set()
    for _ in range(6):
        seen.add(buffers.stage((64, 128), torch.float16).data_ptr())
        buffers.staged()
    assert len(seen) == 2 and len(driver.live) == 2
    assert counters.live["host"] == 2 * (64 * 128 * 2 + 4096)  # two slots, a page of slack each
    buffers.release()
    assert driver.live == {} and counters.live["host"] == 0


def test_lookup_of_any_shape_equals_embedding(tmp_path):
    """Scalars, 1-D, 3-D and non-contiguous ids: the ids go to the host flattened, the result
    comes back in the ids' shape."""
    whole = torch.randn(301, 8)
    matrix, _ = streamed(tmp_path, whole, torch.float32, rows_per_chunk=37)
    ids = torch.tensor([[300, 0, 150], [7, 7, 299]])
    for case in (ids[0, 1], ids[1], ids[None].expand(2, 2, 3), ids.t()):
        assert torch.equal(matrix.take(case), F.embedding(case, whole)), case.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lookup_on_cuda_waits_only_for_ids_on_the_device(tmp_path):
    """Rows from all three tiers: host ids never make the host wait; device ids once (their
    copy to the host, which reading the rows there needs)."""
    cuda = torch.device("cuda", 0)
    whole = torch.randn(301, 24)
    matrix, _ = streamed(tmp_path, whole, torch.float32, rows_per_chunk=37, device=cuda)
    ids = torch.tensor([[300, 0, 150, 151, 152], [7, 7, 299, 60, 151]])
    device_ids, expected = ids.to(cuda), F.embedding(ids, whole)
    matrix.take(ids)  # warms the caching host allocator up
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        from_host_ids = matrix.take(ids)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from_device_ids = matrix.take(device_ids)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert torch.equal(from_host_ids.cpu(), expected)
    assert torch.equal(from_device_ids.cpu(), expected)
