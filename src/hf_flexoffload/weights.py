"""The placed weights of a model: where each row of each tensor lives, and fetching a stage.

A stage's tensors are cut into row segments by ``placement``; each segment is one entry of the
``TierStore``. Fetching a stage gathers its tensors onto the compute device: a tensor wholly on
the device (or, on a CPU machine, in host RAM) is used in place; anything else is read from disk
and/or copied to the device once per fetch, i.e. once per layer per forward pass.

Plain tensors are stored in the *storage* dtype: the checkpoint's when it is narrower than the
compute dtype (a bf16 checkpoint computed in fp32 keeps bf16 bytes on every tier and link), and
are converted into a reused buffer when fetched. The plain embedding and head matrices are not
gathered at all: they are handed to the math as ``StreamedMatrix`` (streamed.py), which reads the
rows a lookup needs and projects a chunk of rows at a time.

A compressed weight is stored as its quantized bytes (``compression.to_bytes``), a flat uint8
tensor placed and split like any other, so every tier holds, and every link moves, only the
compressed bytes; it is dequantized on the compute device right after it arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .architectures import Architecture
from .compression import QuantFormat, QuantizedTensor, dequantize, from_bytes
from .placement import PlacementReport, Segment, TensorSpec, place_tensors, segment_bytes
from .policy import TIERS, Policy, Split
from .stats import Counters
from .storage import TierStore
from .streamed import ChunkBuffers, StreamedMatrix, chunk_rows
from .transfer import host_empty, shares_host_memory

# Disk rows converted to the compute dtype go through a bounce buffer of this size.
BOUNCE_BYTES = 4 << 20

logger = logging.getLogger(__name__)


def segment_key(seg: Segment, spec: TensorSpec) -> str:
    """Store key of a segment: the tensor name, with a row range when the tensor is split."""
    if seg.start == 0 and seg.stop == spec.rows:
        return seg.name
    return f"{seg.name}[{seg.start}:{seg.stop}]"


@dataclass(frozen=True)
class StageLayout:
    """Where one stage's tensors live.

    Attributes:
        specs: The stage's own tensors as stored (checkpoint names; quantized ones as bytes).
        local: Checkpoint name -> name the math uses.
        segments: Row segments of every own tensor.
        aliases: Local name -> checkpoint name of a tensor stored by another stage (a tied LM
            head reads the embedding matrix).
        dtype: The dtype plain (not quantized) tensors are stored in.
        formats: Checkpoint name -> format of the tensors stored quantized.
        compute: The dtype the math uses (``dtype`` when None).
    """

    specs: tuple[TensorSpec, ...]
    local: dict[str, str]
    segments: tuple[Segment, ...]
    aliases: dict[str, str]
    dtype: torch.dtype = torch.float32
    formats: dict[str, QuantFormat] = field(default_factory=dict)
    compute: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute or self.dtype

    def segments_of(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def storage_dtype(self, name: str) -> torch.dtype:
        return torch.uint8 if name in self.formats else self.dtype


def plan_layout(
    stages: list[list[tuple[str, str, tuple[int, ...]]]],
    aliases: list[dict[str, str]],
    split: Split,
    dtype: torch.dtype,
    formats: dict[str, QuantFormat],
    storage: torch.dtype | None = None,
) -> list[StageLayout]:
    """Place every stage's tensors by ``split``.

    Args:
        stages: Per stage, (checkpoint name, local name, shape) of its tensors, in cut order.
        aliases: Per stage, local name -> checkpoint name of tensors it borrows.
        split: The weight split.
        dtype: The compute dtype.
        formats: Checkpoint name -> quantized format, for the tensors to store compressed.
        storage: The dtype plain tensors are stored in (``dtype`` when None).
    """
    storage = storage or dtype
    layouts = []
    for tensors, alias in zip(stages, aliases, strict=True):
        specs = [
            TensorSpec(name, (formats[name].nbytes,), 1)
            if name in formats
            else TensorSpec(name, dims, storage.itemsize)
            for name, _, dims in tensors
        ]
        layouts.append(
            StageLayout(
                specs=tuple(specs),
                local={name: local for name, local, _ in tensors},
                segments=tuple(place_tensors(specs, split)),
                aliases=alias,
                dtype=storage,
                formats={name: formats[name] for name, _, _ in tensors if name in formats},
                compute=dtype,
            )
        )
    return layouts


def placement_report(layouts: list[StageLayout], split: Split) -> PlacementReport:
    per_stage = []
    for layout in layouts:
        per_stage.append(segment_bytes(list(layout.segments), {s.name: s for s in layout.specs}))
    total = {t: sum(s[t] for s in per_stage) for t in TIERS}
    plain = sum(
        layout.formats[s.name].plain_nbytes if s.name in layout.formats else s.nbytes
        for layout in layouts
        for s in layout.specs
    )
    return PlacementReport(
        requested=split, bytes_per_tier=total, per_stage=tuple(per_stage), plain_bytes=plain
    )


def storage_dtype(checkpoint: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype plain weights are stored in: the checkpoint's when it takes fewer bytes than
    the compute dtype (converted when used), else the compute dtype (converted once, at load)."""
    if checkpoint.is_floating_point and checkpoint.itemsize < compute.itemsize:
        return checkpoint
    return compute


def layout_for(
    arch: Architecture, policy: Policy, dtype: torch.dtype, storage: torch.dtype | None = None
) -> list[StageLayout]:
    """Where every weight of ``arch`` goes under ``policy``, and which are stored quantized.

    ``dtype`` is the compute dtype; ``storage`` the dtype plain weights are stored in (see
    ``storage_dtype``; ``dtype`` when None)."""
    stages, formats = [], {}
    for stage, tensors in enumerate(arch.stage_tensors()):
        named = [(arch.checkpoint_name(stage, local), local, dims) for local, dims in tensors]
        stages.append(named)
        for name, local, dims in named:
            if _compressed(policy, arch, local, dims):
                formats[name] = QuantFormat.of(dims, dtype, policy.compress_weights, default_dim=0)
    aliases = [{} for _ in stages]
    for local_name, (stage, name) in arch.head_aliases().items():
        aliases[-1][local_name] = arch.checkpoint_name(stage, name)
    return plan_layout(stages, aliases, policy.weights, dtype, formats, storage)


def _compressed(policy: Policy, arch: Architecture, local: str, dims: tuple[int, ...]) -> bool:
    if policy.compress_weights is None or len(dims) < 2:
        return False
    return policy.compress_embeddings or local not in arch.embeddings


def warn_if_inflated(report: PlacementReport) -> None:
    if report.total_bytes > report.plain_bytes:
        logger.warning(
            "Compressed weights take %.0f%% of their uncompressed size: the group size is larger "
            "than the model's dimensions, so padding outweighs the savings. Use a smaller "
            "group_size.",
            100 * report.compression_ratio,
        )


def in_place(segments: list[Segment], shared: bool) -> bool:
    """Whether a tensor stored as ``segments`` is used where it lies: one segment in compute
    memory (on a CPU machine host RAM is compute memory)."""
    memory = ("device", "host") if shared else ("device",)
    return len(segments) == 1 and segments[0].tier in memory


def is_streamed(
    layout: StageLayout, name: str, local: str, embeddings: frozenset[str], shared: bool
) -> bool:
    """Whether the math gets this tensor as a ``StreamedMatrix``: a plain embedding or head
    matrix that is not already usable in place in the compute dtype."""
    if local not in embeddings or name in layout.formats:
        return False
    spec = next(s for s in layout.specs if s.name == name)
    if len(spec.shape) != 2:
        return False
    return layout.dtype != layout.compute_dtype or not in_place(layout.segments_of(name), shared)


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
    """

    def __init__(
        self,
        layouts: list[StageLayout],
        store: TierStore,
        counters: Counters,
        pooled_stages: range,
        keep_quantized: frozenset[str] = frozenset(),
        chunk_budget: int = 0,
    ) -> None:
        self.layouts = layouts
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
        self._segments = {
            name: layout.segments_of(name) for layout in layouts for name in layout.local
        }
        self._pools: tuple[dict[str, torch.Tensor], ...] = ({}, {})
        self._kept: dict[str, torch.Tensor] = {}  # outer stages' buffers, by checkpoint name
        self._ready: dict[str, torch.Tensor] = {}  # outer stages' weights as the math gets them
        self._buffers = ChunkBuffers(self.device, counters)
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

    def fetch(self, stage: int) -> dict[str, torch.Tensor | QuantizedTensor | StreamedMatrix]:
        """The stage's weights as local name -> tensor on the compute device.

        Runs in the weight-read thread when overlapping. Counts one load of the stage.
        """
        layout = self.layouts[stage]
        pooled = stage in self.pooled_stages
        pool = self._pools[stage % 2] if pooled else self._kept

        def buffer(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if key not in pool:
                pool[key] = (
                    host_empty(shape, dtype, self.device)  # page-aligned for direct reads
                    if shares_host_memory(self.device)
                    else torch.empty(shape, dtype=dtype, device=self.device)
                )
                self.counters.alloc("device", pool[key].numel() * pool[key].element_size())
            return pool[key]

        out = {}
        names = [(local, name) for name, local in layout.local.items()]
        for local, name in names + list(layout.aliases.items()):
            if name in self._streamed:
                out[local] = self._streamed[name]
                continue
            key = local if pooled else name  # kept copies are shared by name (tied heads)
            if not pooled and key in self._ready:
                out[local] = self._ready[key]
                continue
            spec, fmt = self._specs[name], self._formats.get(name)
            convert = fmt is None and self._dtypes[name] != layout.compute_dtype
            if self._in_place(name):
                stored = self._segment_tensor(self._segments[name][0], spec)
            elif convert:  # gathered and converted in one pass, straight into the buffer
                stored = self._gather(name, buffer(key, spec.shape, layout.compute_dtype))
            else:
                stored = self._gather(name, buffer(f"{key}#stored", spec.shape, self._dtypes[name]))
            if fmt is None and stored.dtype != layout.compute_dtype:
                value = buffer(key, spec.shape, layout.compute_dtype).copy_(stored)
            elif fmt is None:
                value = stored
            elif local in self.keep_quantized:
                value = from_bytes(stored, fmt)
            else:
                value = dequantize(from_bytes(stored, fmt), out=buffer(key, fmt.shape, fmt.dtype))
            if not pooled:
                self._ready[key] = value
            out[local] = value
        self.counters.count_stage_load(stage)
        return out

    def close(self) -> None:
        for pool in (*self._pools, self._kept):
            for t in pool.values():
                self.counters.free("device", t.numel() * t.element_size())
            pool.clear()
        self._ready.clear()
        self._buffers.release()

    def _read_converted(self, key: str, dtype: torch.dtype, rows: torch.Tensor) -> None:
        """Disk rows of ``key`` (stored as ``dtype``) into ``rows`` (another dtype), a bounce
        buffer's worth at a time."""
        per = max(1, BOUNCE_BYTES // max(1, rows[0].numel() * dtype.itemsize))
        bounce = self._buffers.get("convert", min(per, rows.shape[0]) * rows[0].numel(), dtype)
        for a in range(0, rows.shape[0], per):
            b = min(rows.shape[0], a + per)
            part = bounce[: (b - a) * rows[0].numel()].view(b - a, *rows.shape[1:])
            rows[a:b].copy_(self.store.read_rows(key, [(a, b)], part))

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
                source = self.store.read_into(
                    key, host_empty(entry.shape, entry.dtype, self.device)
                )
            else:
                source = entry.tensor
            if entry.tier != "device" and not shares_host_memory(self.device):
                self.counters.add_moved("host_to_device", entry.nbytes)
            rows.copy_(source, non_blocking=source.is_pinned())
        return out
