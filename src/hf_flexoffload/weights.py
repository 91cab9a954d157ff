"""The placed weights of a model: where each row of each tensor lives, and fetching a stage.

A stage's tensors are cut into row segments by ``placement``; each segment is one entry of the
``TierStore``. Fetching a stage gathers its tensors onto the compute device: a tensor wholly on
the device (or, on a CPU machine, in host RAM) is used in place; anything else is read from disk
and/or copied to the device once per fetch, i.e. once per layer per forward pass.

A compressed weight is stored as its quantized bytes (``compression.to_bytes``), a flat uint8
tensor placed and split like any other, so every tier holds, and every link moves, only the
compressed bytes; it is dequantized on the compute device right after it arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .architectures import Architecture
from .compression import QuantFormat, dequantize, from_bytes
from .placement import PlacementReport, Segment, TensorSpec, place_tensors, segment_bytes
from .policy import TIERS, Policy, Split
from .stats import Counters
from .storage import TierStore
from .transfer import host_empty, shares_host_memory

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
        dtype: The dtype of plain (not quantized) tensors.
        formats: Checkpoint name -> format of the tensors stored quantized.
    """

    specs: tuple[TensorSpec, ...]
    local: dict[str, str]
    segments: tuple[Segment, ...]
    aliases: dict[str, str]
    dtype: torch.dtype = torch.float32
    formats: dict[str, QuantFormat] = field(default_factory=dict)

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
) -> list[StageLayout]:
    """Place every stage's tensors by ``split``.

    Args:
        stages: Per stage, (checkpoint name, local name, shape) of its tensors, in cut order.
        aliases: Per stage, local name -> checkpoint name of tensors it borrows.
        split: The weight split.
        dtype: The compute dtype, in which plain tensors are stored.
        formats: Checkpoint name -> quantized format, for the tensors to store compressed.
    """
    layouts = []
    for tensors, alias in zip(stages, aliases, strict=True):
        specs = [
            TensorSpec(name, (formats[name].nbytes,), 1)
            if name in formats
            else TensorSpec(name, dims, dtype.itemsize)
            for name, _, dims in tensors
        ]
        layouts.append(
            StageLayout(
                specs=tuple(specs),
                local={name: local for name, local, _ in tensors},
                segments=tuple(place_tensors(specs, split)),
                aliases=alias,
                dtype=dtype,
                formats={name: formats[name] for name, _, _ in tensors if name in formats},
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


def layout_for(arch: Architecture, policy: Policy, dtype: torch.dtype) -> list[StageLayout]:
    """Where every weight of ``arch`` goes under ``policy``, and which are stored quantized."""
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
    return plan_layout(stages, aliases, policy.weights, dtype, formats)


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


class WeightFetcher:
    """Gathers a stage's weights on the compute device from wherever they are stored.

    Decoder layers all have the same tensors, so their gathered copies go into two reusable
    sets of staging buffers (even and odd layers: one being computed, one being prefetched)
    instead of fresh allocations per layer and step, which would fragment the heap and push the
    resident set far above the resident share.

    The embedding and head stages gather into buffers of their own, keyed by checkpoint name, and
    keep the copies: weights never change, so later steps (and a tied head, which borrows the
    embedding) reuse them instead of reading them again. Holding them costs no peak memory, since
    every step's embedding and head stages need them anyway, and it saves the re-read and the page
    faults of a fresh multi-hundred-MB allocation per stage and step.

    Compressed weights are dequantized into buffers of the same kind, except those whose local
    name is in ``keep_quantized`` (the embedding matrices): they are handed to the math as
    ``QuantizedTensor`` views, which dequantizes only what it reads.
    """

    def __init__(
        self,
        layouts: list[StageLayout],
        store: TierStore,
        counters: Counters,
        pooled_stages: range,
        keep_quantized: frozenset[str] = frozenset(),
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
        self._kept: dict[str, torch.Tensor] = {}  # outer stages' gathered copies, by name

    def fetch(self, stage: int) -> dict[str, torch.Tensor]:
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
            spec = self._specs[name]
            key = local if pooled else name  # kept copies are shared by name (tied heads)
            kept = not pooled and f"{key}#stored" in pool  # gathered by an earlier fetch
            if self._in_place(name):
                stored = self._segment_tensor(self._segments[name][0], spec)
            elif kept:
                stored = pool[f"{key}#stored"]
            else:
                stored = self._gather(name, buffer(f"{key}#stored", spec.shape, self._dtypes[name]))
            fmt = self._formats.get(name)
            if fmt is None:
                out[local] = stored
            elif local in self.keep_quantized:
                out[local] = from_bytes(stored, fmt)
            elif kept and key in pool:
                out[local] = pool[key]
            else:
                out[local] = dequantize(
                    from_bytes(stored, fmt), out=buffer(key, fmt.shape, fmt.dtype)
                )
        self.counters.count_stage_load(stage)
        return out

    def close(self) -> None:
        for pool in (*self._pools, self._kept):
            for t in pool.values():
                self.counters.free("device", t.numel() * t.element_size())
            pool.clear()

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
        """The full stored tensor in ``out``, a buffer on the compute device."""
        spec, segments = self._specs[name], self._segments[name]
        for seg in segments:
            key = segment_key(seg, spec)
            entry = self.store.entry(key)
            rows = out[seg.start : seg.stop]  # contiguous: a row range of a contiguous tensor
            if entry.tier == "disk" and shares_host_memory(self.device):
                self.store.read_into(key, rows)
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
