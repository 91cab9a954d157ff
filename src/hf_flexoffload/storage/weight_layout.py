"""Where each row of each weight lives: the stages' tensors cut into row segments by tier
(``placement``), the dtype each is stored in, and which are stored quantized.

Plain tensors are stored in the *storage* dtype: the checkpoint's when it is narrower than the
compute dtype (a bf16 checkpoint computed in fp32 keeps bf16 bytes on every tier and link), and
are converted when fetched. A compressed weight is stored as its quantized bytes
(``compression.to_bytes``), a flat uint8 tensor placed and split like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..architectures import Architecture
from ..config.policy import TIERS, Policy, Split
from ..formats.compression import QuantFormat
from .placement import PlacementReport, Segment, TensorSpec, place_tensors, segment_bytes

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
    unit_of: Callable[[str], int | None] = lambda local: None,
) -> list[StageLayout]:
    """Place every stage's tensors by ``split``.

    Args:
        stages: Per stage, (checkpoint name, local name, shape) of its tensors, in cut order.
        aliases: Per stage, local name -> checkpoint name of tensors it borrows.
        split: The weight split.
        dtype: The compute dtype.
        formats: Checkpoint name -> quantized format, for the tensors to store compressed.
        storage: The dtype plain tensors are stored in (``dtype`` when None).
        unit_of: Local name -> the unit (an expert) whose tensors are never split between
            tiers, or None.
    """
    storage = storage or dtype
    layouts = []
    for tensors, alias in zip(stages, aliases, strict=True):
        specs = [
            TensorSpec(name, (formats[name].nbytes,), 1, unit_of(local))
            if name in formats
            else TensorSpec(name, dims, storage.itemsize, unit_of(local))
            for name, local, dims in tensors
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
                formats[name] = QuantFormat.of(dims, dtype, policy.compress_weights)
    aliases = [{} for _ in stages]
    for local_name, (stage, name) in arch.head_aliases().items():
        aliases[-1][local_name] = arch.checkpoint_name(stage, name)
    return plan_layout(stages, aliases, policy.weights, dtype, formats, storage, arch.expert_of)


def _compressed(policy: Policy, arch: Architecture, local: str, dims: tuple[int, ...]) -> bool:
    if policy.compress_weights is None or len(dims) < 2 or not arch.quantizable(local):
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
