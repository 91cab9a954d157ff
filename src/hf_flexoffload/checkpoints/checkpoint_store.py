"""A checkpoint into the tiered store: every segment placed, in the layout's storage dtypes.

Disk segments whose stored form is the checkpoint's own bytes (same dtype, not compressed, in a
file that holds raw bytes) are not copied: the store reads them from the checkpoint file, at
their offset. Everything else is read, converted and written a chunk of rows at a time straight
into its destination (a memory-tier tensor, or a file of the disk tier); a weight to compress is
quantized a block of rows at a time and its bytes placed like any segment.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..formats.quantized_matrix import quantize_rows_to_bytes
from ..storage.placement import Segment
from ..storage.tier_store import TierStore
from ..storage.weight_layout import StageLayout, segment_key
from .checkpoint import Checkpoint

# Loading converts and writes a chunk of rows at a time: at most ``load_chunk_bytes`` of
# checkpoint rows, and as many of converted rows, are in RAM beside what the placement keeps
# (the memory model counts them).
LOAD_CHUNK_BYTES = 16 << 20
_MIN_LOAD_CHUNK = 1 << 20


def load_chunk_bytes(largest_layer_tensor: int) -> int:
    """Bytes per load chunk for a model whose largest decoder-layer tensor has that many
    elements: one byte per element of it, between 1 MiB and ``LOAD_CHUNK_BYTES`` (small models
    get small chunks, so the load buffers stay a small share of them)."""
    return min(LOAD_CHUNK_BYTES, max(_MIN_LOAD_CHUNK, largest_layer_tensor))


def read_in_place(ckpt: Checkpoint, layout: StageLayout, seg: Segment) -> tuple[str, int] | None:
    """(file, offset) of a disk segment that the store can read straight from the checkpoint:
    its stored form is the checkpoint's bytes. None when it must be written to the disk tier."""
    if seg.tier != "disk":
        return None
    stored = ckpt.tensors[seg.name]
    if stored.dtype != layout.storage_dtype(seg.name):  # converted, or to be quantized
        return None
    return ckpt.file_range(seg.name, seg.start)


def bytes_to_write(ckpt: Checkpoint, layouts: list[StageLayout]) -> int:
    """Bytes a load writes to the disk tier's directory (what is not read in place)."""
    total = 0
    for layout in layouts:
        specs = {s.name: s for s in layout.specs}
        for seg in layout.segments:
            if seg.tier == "disk" and read_in_place(ckpt, layout, seg) is None:
                total += (seg.stop - seg.start) * specs[seg.name].row_bytes
    return total


def load_into_store(
    ckpt: Checkpoint,
    layouts: list[StageLayout],
    store: TierStore,
    chunk_bytes: int = LOAD_CHUNK_BYTES,
) -> int:
    """Place every segment of every stage in the store, in the layout's storage dtypes.

    Disk segments in the checkpoint's own form are registered where they lie in its files;
    plain tensors are read, converted and written a chunk of rows at a time straight into their
    destination; tensors to compress are quantized (on the compute device, a block of rows at a
    time) and their bytes placed, unless the checkpoint already holds them quantized. Disk
    segments a previous run left complete (same checkpoint, dtype, compression and placement)
    are adopted instead of rewritten. Returns the bytes read from the checkpoint.
    """
    read = 0
    scratch = _Scratch(chunk_bytes)
    for layout in layouts:
        specs = {s.name: s for s in layout.specs}
        packed_name, packed = None, None  # the tensor being quantized, and its bytes
        for seg in layout.segments:
            spec = specs[seg.name]
            key = segment_key(seg, spec)
            shape = (seg.stop - seg.start, *spec.shape[1:])
            dtype = layout.storage_dtype(seg.name)
            in_place = read_in_place(ckpt, layout, seg)
            if in_place is not None:
                store.reference(key, shape, dtype, *in_place)
                continue
            if seg.tier == "disk" and store.adopt(key, shape, dtype):
                continue
            stored = ckpt.tensors[seg.name]
            if seg.name in layout.formats and stored.dtype != torch.uint8:
                if packed_name != seg.name:
                    packed_name, packed = None, None  # free the previous tensor's bytes first
                    packed = _quantized_bytes(ckpt, layout, seg.name, store.device, chunk_bytes)
                    packed_name = seg.name
                    read += stored.row_bytes * stored.shape[0]
                store.put(key, packed[seg.start : seg.stop], seg.tier)
                continue
            direct = seg.tier != "disk" and stored.dtype == dtype
            if direct and (store.device.type == "cpu" or seg.tier == "host"):
                # Read straight into the tier's tensor: no second copy in RAM.
                ckpt.read_rows(
                    seg.name, seg.start, seg.stop, store.allocate(key, shape, dtype, seg.tier)
                )
            else:
                chunks = _row_chunks(ckpt, seg.name, seg.start, seg.stop, dtype, scratch)
                store.put_chunks(key, shape, dtype, seg.tier, chunks)
            read += (seg.stop - seg.start) * stored.row_bytes
    ckpt.close()
    return read


class _Scratch:
    """The two reused chunk buffers of a load: checkpoint rows, and the same rows converted."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def _row_chunks(
    ckpt: Checkpoint,
    name: str,
    start: int,
    stop: int,
    dtype: torch.dtype,
    scratch: _Scratch,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row offset from ``start``, rows in ``dtype``) chunks of rows ``[start, stop)``."""
    stored = ckpt.tensors[name]
    step = max(1, scratch.chunk_bytes // max(1, stored.row_bytes))
    for a in range(start, stop, step):
        b = min(stop, a + step)
        shape = (b - a, *stored.shape[1:])
        rows = scratch.get("read", (b - a) * stored.row_bytes).view(stored.dtype).view(shape)
        ckpt.read_rows(name, a, b, rows)
        if dtype != stored.dtype:
            converted = scratch.get("converted", rows.numel() * dtype.itemsize)
            rows = converted.view(dtype).view(shape).copy_(rows)
        yield a - start, rows


def _quantized_bytes(
    ckpt: Checkpoint,
    layout: StageLayout,
    name: str,
    device: torch.device,
    chunk_bytes: int,
) -> torch.Tensor:
    fmt = layout.formats[name]

    def read(start: int, stop: int) -> torch.Tensor:
        return ckpt.read_rows(name, start, stop).to(device, fmt.dtype)

    return quantize_rows_to_bytes(read, fmt, block_bytes=chunk_bytes)
