"""Embedding and LM-head matrices used where they are stored, never gathered whole.

A token embedding is the largest single weight of most models (40% of a small OPT), and a
lookup needs only a few of its rows; the LM head needs every row but only one chunk at a time.
So a ``StreamedMatrix`` reads exactly the rows a lookup asks for (one positional read per run
of consecutive rows on disk), and projects through its rows a chunk at a time, reading and
converting each chunk into one reused buffer. Its memory is the chunk buffers (about the size
of a decoder layer's largest matrix) instead of the whole matrix in the compute dtype.

Rows stored in another dtype than the compute dtype (a bf16 checkpoint computed in fp32) are
converted as they are used, which gives exactly the values a converted copy would hold.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..architectures.layers import StreamedRows
from ..config.counters import Counters
from .tier_store import TierStore
from .transfer import (
    ChunkCopies,
    PinnedHost,
    StagingRing,
    host_empty,
    shares_host_memory,
    to_compute,
    upload,
)

# Chunk buffers are at least this large, so tiny models do not run thousands of tiny matmuls.
MIN_CHUNK_BYTES = 1 << 20


def chunk_rows(rows: int, row_bytes: int, budget: int) -> int:
    """Rows per chunk: as many as ``max(budget, MIN_CHUNK_BYTES)`` bytes hold, at most all."""
    return max(1, min(rows, max(budget, MIN_CHUNK_BYTES) // max(1, row_bytes)))


class ChunkBuffers:
    """Named reusable buffers, grown on demand and counted as device memory, and the pinned
    staging ring that disk rows bound for a CUDA device pass through (counted as host memory).

    Args:
        pinned: Where staging buffers come from (the store's, so ``Policy.pin_weights`` holds).
    """

    def __init__(
        self, device: torch.device, counters: Counters, pinned: PinnedHost | None = None
    ) -> None:
        self.device = device
        self.counters = counters
        self._buffers: dict[str, torch.Tensor] = {}
        self._staging = StagingRing(pinned if pinned is not None else PinnedHost(device))
        self.copies = ChunkCopies(device)  # host rows to the device, on a side stream

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements of ``dtype`` on the compute device."""
        key = f"{name}:{dtype}"
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.release(key)
            if shares_host_memory(self.device):
                buf = host_empty((numel,), dtype, self.device)
            else:
                buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[key] = buf
            self.counters.alloc("device", buf.numel() * buf.element_size())
        return buf[:numel]

    def stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer to read rows into before copying them to the device; call
        ``staged`` once the copy is enqueued (the buffer is refilled only after it has run, so a
        chunk's copy overlaps the next chunk's read)."""
        before = self._staging.nbytes
        buf = self._staging.take(shape, dtype)
        self.counters.alloc("host", self._staging.nbytes - before)
        return buf

    def staged(self) -> None:
        self._staging.copied()

    def release(self, key: str | None = None) -> None:
        for name in [key] if key is not None else list(self._buffers):
            buf = self._buffers.pop(name, None)
            if buf is not None:
                self.counters.free("device", buf.numel() * buf.element_size())
        if key is None:
            self.counters.free("host", self._staging.nbytes)
            self._staging.close()


class StreamedMatrix(StreamedRows):
    """A (rows, cols) weight stored as row segments on any tiers, used in place.

    Args:
        parts: (store key, first row, stop row) of each segment, in row order.
        store: Where the segments are.
        shape: (rows, cols) of the whole matrix.
        dtype: The compute dtype that lookups and projections return.
        rows_per_chunk: Rows a projection reads and converts at a time.
        buffers: Reused chunk buffers (shared with the model's other streamed matrices, which
            are used one after another in the compute thread).
    """

    def __init__(
        self,
        *,
        parts: list[tuple[str, int, int]],
        store: TierStore,
        shape: tuple[int, int],
        dtype: torch.dtype,
        rows_per_chunk: int,
        buffers: ChunkBuffers,
    ) -> None:
        self.parts = parts
        self.store = store
        self.shape = shape
        self.dtype = dtype
        self.rows_per_chunk = rows_per_chunk
        self.buffers = buffers
        self.device = store.device

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) -> (*ids.shape, cols) in the compute dtype, reading only
        those rows.

        The host decides which rows to read, so it needs the ids: the engine hands them over on
        the host (one copy per forward for the whole block, ``MicroBatch.host_ids``); ids that
        live on a GPU are copied here, which waits for the device. Everything about them is
        worked out on the host; what goes back to the device (the row order, the rows) goes
        through pinned memory without blocking.
        """
        host_ids = ids.reshape(-1).cpu()  # no-op for host ids (no copy, no wait)
        wanted, inverse = torch.unique(host_ids, return_inverse=True)  # sorted
        found = []
        for key, start, stop in self.parts:
            local = wanted[(wanted >= start) & (wanted < stop)] - start
            if local.numel():
                found.append(self._rows_at(key, local))
        rows = torch.cat(found) if len(found) > 1 else found[0]
        order = upload(inverse, self.device)
        return rows.to(self.dtype).index_select(0, order).reshape(*ids.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, matrix)``: (..., cols) -> (..., rows), one chunk of rows at a time."""
        out = x.new_empty((*x.shape[:-1], self.shape[0]))
        for start, weight in self.chunks():
            out[..., start : start + weight.shape[0]] = F.linear(x, weight)
        return out

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows in the compute dtype on the device) for every chunk, in order; each
        chunk is valid until the next is produced.

        On a GPU the next chunk is fetched once the caller has enqueued its use of this one:
        host rows are copied on a side stream into the other of two buffers (``ChunkCopies``),
        disk rows read on the host, both while the GPU computes with this chunk.
        """
        spans = [
            (key, a - start, min(stop, a + self.rows_per_chunk) - start, a)
            for key, start, stop in self.parts
            for a in range(start, stop, self.rows_per_chunk)
        ]
        if shares_host_memory(self.device):
            for key, a, b, first in spans:
                yield first, self._chunk(key, a, b)
            return
        copies = self.buffers.copies
        pending = self._fetch(spans[0], 0) if spans else None
        for i, (_, _, _, first) in enumerate(spans):
            source, done = pending
            copies.ready(done)
            yield first, self._converted(source)
            copies.used(i % 2)
            if i + 1 < len(spans):
                pending = self._fetch(spans[i + 1], (i + 1) % 2)

    def _fetch(self, span: tuple[str, int, int, int], slot: int) -> tuple[torch.Tensor, object]:
        """Start moving rows [a, b) of segment ``key`` into device buffer ``slot`` (GPU)."""
        key, a, b, _ = span
        entry = self.store.entry(key)
        if entry.tensor is not None and entry.tensor.device == self.device:
            return entry.tensor[a:b], None
        cols, n = self.shape[1], b - a
        source = self.buffers.get(f"stored{slot}", self.rows_per_chunk * cols, entry.dtype)
        source = source[: n * cols].view(n, cols)
        if entry.tensor is not None:  # host tier: a side-stream copy
            return source, self.buffers.copies.copy(slot, source, entry.tensor[a:b])
        bounce = self.buffers.stage((n, cols), entry.dtype)
        source.copy_(self.store.read_rows(key, [(a, b)], bounce), non_blocking=True)
        self.buffers.staged()
        return source, None

    def _converted(self, source: torch.Tensor) -> torch.Tensor:
        if source.dtype == self.dtype:
            return source
        n, cols = source.shape
        converted = self.buffers.get("converted", self.rows_per_chunk * cols, self.dtype)
        return converted[: n * cols].view(n, cols).copy_(source)

    def _chunk(self, key: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of segment ``key`` where the device is the host: used in place, or read
        into the one reused buffer."""
        entry = self.store.entry(key)
        cols, n = self.shape[1], b - a
        if entry.tensor is not None:
            return self._converted(entry.tensor[a:b])
        source = self.buffers.get("stored", self.rows_per_chunk * cols, entry.dtype)
        source = source[: n * cols].view(n, cols)
        self.store.read_rows(key, [(a, b)], source)
        return self._converted(source)

    def _rows_at(self, key: str, local: torch.Tensor) -> torch.Tensor:
        """Rows ``local`` (sorted, on the host) of one segment, on the device in the stored
        dtype; host rows cross through pinned memory, so nothing here waits for the device."""
        entry = self.store.entry(key)
        if entry.tensor is not None and entry.tensor.device.type != "cpu":
            return entry.tensor.index_select(0, upload(local, entry.tensor.device))
        out = host_empty((local.numel(), self.shape[1]), entry.dtype, self.device, pin=True)
        if entry.tensor is not None:
            torch.index_select(entry.tensor, 0, local, out=out)
        else:
            self.store.read_rows(key, _runs(local.tolist()), out)
        return to_compute(out, self.device)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct row numbers as [start, stop) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
