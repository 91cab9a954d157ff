"""Fetching a stage's placed weights onto the compute device.

Each segment of a stage's tensors (``weight_layout``) is one entry of the ``TierStore``.
Fetching a stage gathers its tensors onto the compute device: a tensor wholly on the device
(or, on a CPU machine, in host RAM) is used in place; anything else is read from disk and/or
copied to the device once per fetch, i.e. once per layer per forward pass. Plain tensors stored
in a narrower dtype are converted into a reused buffer as they arrive. The plain embedding and
head matrices are not gathered at all: they are handed to the math as ``StreamedMatrix``
(streamed.py), which reads the rows a lookup needs and projects a chunk of rows at a time.
Compressed weights move as their quantized bytes and are dequantized on the compute device
right after they arrive, except in steps where the int4 kernel multiplies them as they are
(``kernel_rows``): those are handed over as a ``KernelOperand`` over the bytes.
"""

from __future__ import annotations

import math

import torch

from ..config.counters import Counters
from ..formats.compression import QuantizedTensor, TiledInt4, dequantize, from_bytes
from ..formats.int4_tiled import KernelOperand
from .placement import Segment, TensorSpec
from .streamed import ChunkBuffers, StreamedMatrix, chunk_rows
from .tier_store import TierStore
from .transfer import PAGE, StagingRing, at_phase, host_empty, shares_host_memory
from .weight_layout import StageLayout, is_streamed, segment_key

# Disk rows converted to the compute dtype go through a ring of READ_AHEAD bounce buffers of
# this size: one being converted while the others' direct reads are in flight.
BOUNCE_BYTES = 8 << 20
READ_AHEAD = 4


class WeightFetcher:
    """Gathers a stage's weights on the compute device from wherever they are stored.

    Decoder layers all have the same tensors, so their gathered (and converted or dequantized)
    copies go into two reusable sets of staging buffers (even and odd layers: one being
    computed, one being prefetched) instead of fresh allocations per layer and step, which
    would fragment the heap and push the resident set far above the resident share.

    The plain embedding and head matrices are handed over as ``StreamedMatrix`` (no copy); the
    outer stages' other tensors (norms, projections, and embeddings stored quantized) are
    gathered once into buffers of their own and kept, since weights never change.

    Compressed weights are dequantized into buffers of the same kind, except those whose local
    name is in ``keep_quantized`` (the embedding matrices): they are handed to the math as
    ``QuantizedTensor`` views, which dequantizes only what it reads.

    Args:
        chunk_budget: Bytes of one chunk buffer of a streamed matrix.
        kernel_rows: Steps computing at most this many rows per layer get weights stored in
            the int4 kernel's layout as a ``KernelOperand`` (0: never).
    """

    def __init__(
        self,
        layouts: list[StageLayout],
        store: TierStore,
        counters: Counters,
        pooled_stages: range,
        keep_quantized: frozenset[str] = frozenset(),
        chunk_budget: int = 0,
        kernel_rows: int = 0,
    ) -> None:
        self.layouts = layouts
        self.kernel_rows = kernel_rows
        self.store = store
        self.counters = counters
        self.device = store.device
        self.pooled_stages = pooled_stages
        self.keep_quantized = keep_quantized
        self._specs = {s.name: s for layout in layouts for s in layout.specs}
        self._dtypes = {
            s.name: layout.storage_dtype(s.name) for layout in layouts for s in layout.specs
        }
        self._formats = {name: f for layout in layouts for name, f in layout.formats.items()}
        self._compute_dtypes = {
            s.name: layout.compute_dtype for layout in layouts for s in layout.specs
        }
        # Checkpoint name -> expert, for a sparse layer's expert tensors (fetched as units).
        self._expert = {
            s.name: s.unit for layout in layouts for s in layout.specs if s.unit is not None
        }
        self._segments = {
            name: layout.segments_of(name) for layout in layouts for name in layout.local
        }
        self._pools: tuple[dict[str, torch.Tensor], ...] = ({}, {})
        self._kept: dict[str, torch.Tensor] = {}  # outer stages' buffers, by checkpoint name
        self._ready: dict[str, torch.Tensor] = {}  # outer stages' weights as the math gets them
        self._buffers = ChunkBuffers(self.device, counters, store.pinned)
        self._staging = StagingRing(store.pinned)  # disk -> device copies on CUDA
        self._streamed = self._streamed_matrices(chunk_budget)

    def _streamed_matrices(self, budget: int) -> dict[str, StreamedMatrix]:
        shared = shares_host_memory(self.device)
        out = {}
        for stage, layout in enumerate(self.layouts):
            if stage in self.pooled_stages:
                continue
            for name, local in layout.local.items():
                if not is_streamed(layout, name, local, self.keep_quantized, shared):
                    continue
                spec = self._specs[name]
                rows, cols = spec.shape
                out[name] = StreamedMatrix(
                    parts=[(segment_key(g, spec), g.start, g.stop) for g in self._segments[name]],
                    store=self.store,
                    shape=(rows, cols),
                    dtype=layout.compute_dtype,
                    rows_per_chunk=chunk_rows(rows, cols * layout.compute_dtype.itemsize, budget),
                    buffers=self._buffers,
                )
        return out

    def fetch(
        self, stage: int, rows: int = 0, routed: bool = False
    ) -> dict[str, torch.Tensor | QuantizedTensor | TiledInt4 | KernelOperand | StreamedMatrix]:
        """The stage's weights as local name -> tensor on the compute device.

        Runs in the weight-read thread when overlapping. Counts one load of the stage.

        Args:
            stage: The stage.
            rows: Rows the step computes per layer (micro-batch size x new tokens): at most
                ``kernel_rows`` hands weights in the kernel's layout over as they are.
            routed: Leave out the experts that would have to be moved or converted
                (``deferred``): ``fetch_experts`` gathers those the block routes to.
        """
        layout = self.layouts[stage]
        skip = self.deferred(stage, rows) if routed else set()
        names = [
            (local, name)
            for name, local in layout.local.items()
            if self._expert.get(name) not in skip
        ]
        out = self._gather_named(stage, names + list(layout.aliases.items()), rows)
        self.counters.count_stage_load(stage)
        return out

    def fetch_experts(self, stage: int, experts: list[int], rows: int = 0) -> dict:
        """The tensors of ``experts`` of a sparse layer, gathered like ``fetch``'s."""
        wanted = set(experts)
        names = [
            (local, name)
            for name, local in self.layouts[stage].local.items()
            if self._expert.get(name) in wanted
        ]
        return self._gather_named(stage, names, rows)

    def deferred(self, stage: int, rows: int = 0) -> set[int]:
        """The experts of ``stage`` that fetching would move or convert: read only when routed
        to. Experts used where they are stored cost nothing to hand over and are always in."""
        kernel = 0 < rows <= self.kernel_rows
        return {
            self._expert[name]
            for name in self.layouts[stage].local
            if name in self._expert and not self._free(name, kernel)
        }

    def routed_bytes(self, stage: int, experts: list[int]) -> int:
        """Stored bytes of ``experts``' tensors that are not in compute memory (fetching them
        reads or copies those bytes)."""
        wanted = set(experts)
        return sum(
            spec.nbytes
            for spec in self.layouts[stage].specs
            if self._expert.get(spec.name) in wanted and not self._in_place(spec.name)
        )

    def _gather_named(self, stage: int, names: list[tuple[str, str]], rows: int) -> dict:
        """``(local, checkpoint name)`` tensors of ``stage`` on the compute device."""
        layout = self.layouts[stage]
        kernel = 0 < rows <= self.kernel_rows
        pooled = stage in self.pooled_stages
        pool = self._pools[stage % 2] if pooled else self._kept

        def buffer(
            key: str, shape: tuple[int, ...], dtype: torch.dtype, phase: int = 0
        ) -> torch.Tensor:
            # Host buffers get a page of slack, so each fetch can place the tensor at the page
            # phase of its rows' file offset (it differs between layers) for direct reads.
            nbytes = dtype.itemsize * math.prod(shape)
            shared = shares_host_memory(self.device)
            if key not in pool:
                pool[key] = (
                    host_empty((nbytes + PAGE,), torch.uint8, self.device)
                    if shared
                    else torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                )
                self.counters.alloc("device", pool[key].numel())
            raw = at_phase(pool[key], nbytes, phase) if shared else pool[key]
            return raw.view(dtype).view(shape)

        out = {}
        for local, name in names:
            if name in self._streamed:
                out[local] = self._streamed[name]
                continue
            key = local if pooled else name  # kept copies are shared by name (tied heads)
            # A weight the kernel may multiply is kept in both forms (its bytes are kept anyway).
            ready = f"{key}@kernel" if kernel and self._by_rows(name) else key
            if not pooled and ready in self._ready:
                out[local] = self._ready[ready]
                continue
            spec, fmt = self._specs[name], self._formats.get(name)
            convert = fmt is None and self._dtypes[name] != layout.compute_dtype
            kept = f"{key}#stored"  # an outer stage's gathered bytes serve both forms
            if self._in_place(name):
                stored = self._segment_tensor(self._segments[name][0], spec)
            elif not pooled and kept in self._ready:
                stored = self._ready[kept]
            elif convert:  # gathered and converted in one pass, straight into the buffer
                stored = self._gather(name, buffer(key, spec.shape, layout.compute_dtype))
            else:
                phase = self._disk_phase(name)
                stored = self._gather(
                    name, buffer(f"{key}#stored", spec.shape, self._dtypes[name], phase)
                )
            if fmt is None and stored.dtype != layout.compute_dtype:
                value = buffer(key, spec.shape, layout.compute_dtype).copy_(stored)
            elif fmt is None:
                value = stored
            elif kernel and fmt.tiled:
                value = KernelOperand(from_bytes(stored, fmt))
            elif local in self.keep_quantized:
                value = from_bytes(stored, fmt)
            else:
                value = dequantize(from_bytes(stored, fmt), out=buffer(key, fmt.shape, fmt.dtype))
            if not pooled:
                self._ready[ready] = value
                if fmt is not None and self._by_rows(name):
                    self._ready[kept] = stored
            out[local] = value
        return out

    def streams(self, stage: int) -> bool:
        """Whether ``stage`` has a matrix used where it is stored (``StreamedMatrix``), whose
        lookups choose rows on the host."""
        return any(name in self._streamed for name in self.layouts[stage].local)

    def idle(self, stage: int, rows: int = 0, routed: bool = False) -> bool:
        """Whether fetching ``stage`` moves and converts nothing (every tensor used where it is
        stored, streamed, or kept from an earlier fetch), so it can run inline. ``routed``: as
        ``fetch(routed=True)``, which leaves the deferred experts out."""
        layout = self.layouts[stage]
        pooled = stage in self.pooled_stages
        kernel = 0 < rows <= self.kernel_rows
        skip = self.deferred(stage, rows) if routed else set()
        for name in layout.local:
            ready = f"{name}@kernel" if kernel and self._by_rows(name) else name
            if name in self._streamed or (not pooled and ready in self._ready):
                continue
            if self._expert.get(name) in skip:
                continue
            if not self._free(name, kernel):
                return False
        return True

    def experts_idle(self, stage: int, experts: list[int], rows: int = 0) -> bool:
        """Whether gathering ``experts`` moves and converts nothing."""
        return not self.deferred(stage, rows) & set(experts)

    def _free(self, name: str, kernel: bool) -> bool:
        """Whether handing ``name`` over moves and converts nothing: used where it is stored
        in the compute dtype (or as stored, by the int4 kernel)."""
        fmt, stored = self._formats.get(name), self._dtypes[name]
        if kernel and fmt is not None and fmt.tiled and self._in_place(name):
            return True  # the kernel reads the stored bytes where they are
        return fmt is None and stored == self._compute_dtypes[name] and self._in_place(name)

    def _by_rows(self, name: str) -> bool:
        """Whether how ``name`` is handed over depends on the step's rows (so an outer stage's
        copy is not kept from one step for the next)."""
        fmt = self._formats.get(name)
        return self.kernel_rows > 0 and fmt is not None and fmt.tiled

    def close(self) -> None:
        for pool in (*self._pools, self._kept):
            for t in pool.values():
                self.counters.free("device", t.numel())
            pool.clear()
        self._ready.clear()
        self._buffers.release()
        self.counters.free("host", self._staging.nbytes)
        self._staging.close()

    def _read_converted(self, key: str, dtype: torch.dtype, rows: torch.Tensor) -> None:
        """Disk rows of ``key`` (stored as ``dtype``) into ``rows`` (another dtype), a bounce
        buffer's worth at a time, converted while the next reads are in flight (direct reads
        land in place: see ``_disk_phase``)."""
        n, row_bytes = rows.shape[0], rows[0].numel() * dtype.itemsize
        per = max(1, BOUNCE_BYTES // max(1, row_bytes))
        ring = [
            self._buffers.get(f"convert{k}", min(per, n) * row_bytes + PAGE, torch.uint8)
            for k in range(READ_AHEAD)
        ]
        offset = self.store.entry(key).offset
        runs = [(a, min(n, a + per)) for a in range(0, n, per)]
        views = []
        for i, (a, b) in enumerate(runs):
            phase = _phase(offset + a * row_bytes, dtype)
            raw = at_phase(ring[i % READ_AHEAD], (b - a) * row_bytes, phase)
            views.append(raw.view(dtype).view(b - a, *rows.shape[1:]))
        parts = self.store.read_rows_ahead(key, runs, views, READ_AHEAD)
        for (a, b), part in zip(runs, parts, strict=True):
            rows[a:b].copy_(part)

    def _disk_phase(self, name: str) -> int:
        """The page phase at which a buffer for ``name`` in its stored dtype must start so its
        disk rows land at their file offset's phase (and direct reads skip the bounce)."""
        spec = self._specs[name]
        for seg in self._segments[name]:
            entry = self.store.entry(segment_key(seg, spec))
            if entry.tier == "disk":
                return _phase(entry.offset - seg.start * spec.row_bytes, entry.dtype)
        return 0

    def _in_place(self, name: str) -> bool:
        """Used where it is stored: one segment, already in compute-device memory."""
        segments = self._segments[name]
        if len(segments) != 1:
            return False
        entry = self.store.entry(segment_key(segments[0], self._specs[name]))
        return entry.tensor is not None and entry.tensor.device == self.device

    def _segment_tensor(self, seg: Segment, spec: TensorSpec) -> torch.Tensor:
        return self.store.entry(segment_key(seg, spec)).tensor

    def _gather(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """The full stored tensor in ``out``, a buffer on the compute device, converted to
        ``out``'s dtype on the way (disk rows through a small bounce buffer)."""
        spec, segments = self._specs[name], self._segments[name]
        for seg in segments:
            key = segment_key(seg, spec)
            entry = self.store.entry(key)
            rows = out[seg.start : seg.stop]  # contiguous: a row range of a contiguous tensor
            if entry.tier == "disk" and shares_host_memory(self.device):
                if entry.dtype == out.dtype:
                    self.store.read_into(key, rows)
                else:
                    self._read_converted(key, entry.dtype, rows)
                continue
            if entry.tier == "disk":
                phase = _phase(entry.offset, entry.dtype)
                source = self.store.read_into(key, self._stage(entry.shape, entry.dtype, phase))
            else:
                source = entry.tensor
            if entry.tier != "device" and not shares_host_memory(self.device):
                self.counters.add_moved("host_to_device", entry.nbytes)
            rows.copy_(source, non_blocking=source.is_pinned())
            if entry.tier == "disk":
                self._staging.copied()
        return out

    def _stage(self, shape: tuple[int, ...], dtype: torch.dtype, phase: int) -> torch.Tensor:
        """A reused pinned buffer that disk rows bound for the device land in (counted as host
        memory while held)."""
        before = self._staging.nbytes
        buf = self._staging.take(shape, dtype, phase)
        self.counters.alloc("host", self._staging.nbytes - before)
        return buf


def _phase(offset: int, dtype: torch.dtype) -> int:
    """``offset``'s distance past a page boundary, when a ``dtype`` buffer can start there.

    Compressed bytes (uint8) hold wider fields that are viewed in place, so every buffer needs
    8-byte alignment."""
    phase = offset % PAGE
    return phase if phase % max(8, dtype.itemsize) == 0 else 0
