"""Which bytes go to which tier: pure functions over shapes, no tensors.

FlexGen assigned whole tensors by their cumulative-size midpoint, so "20% on GPU" could really be
8%. Here a layer's tensors are laid end to end as one byte stream and the stream is cut at the
requested fractions; a cut that falls inside a tensor splits it between rows (dim 0). Every
layer then realizes its split to within half a row at each of the two cuts, except that a cut
never falls inside a *unit* (a mixture-of-experts layer's expert): it moves to the unit's nearer
end, so an expert lives on one tier and is fetched (or not) as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.counters import human_bytes
from ..config.policy import TIERS, Split

if TYPE_CHECKING:  # memory_model builds on placement: the type only, no import cycle
    from ..planning.memory_model import Footprint


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to place: its name, shape and bytes per element."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    unit: int | None = None  # tensors of one unit (an expert) are never split between tiers

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        n = self.itemsize
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of tensor ``name`` live on ``tier``."""

    name: str
    tier: str
    start: int
    stop: int


def place_tensors(specs: list[TensorSpec], split: Split) -> list[Segment]:
    """Cut one layer's tensors at the split's fractions.

    Args:
        specs: The layer's tensors, in a fixed order (the order decides which tensors get split).
        split: Requested fractions per tier.

    Returns:
        Segments covering every row of every tensor exactly once, in tier order per tensor.
    """
    total = sum(s.nbytes for s in specs)
    cuts = _whole_units(specs, (split.device * total, (split.device + split.host) * total))
    segments: list[Segment] = []
    offset = 0
    for spec in specs:
        rows, row_bytes = spec.rows, spec.row_bytes
        # Row index of each cut inside this tensor, rounded to the nearest row.
        inner = [
            min(rows, max(0, round((cut - offset) / row_bytes))) if row_bytes else 0 for cut in cuts
        ]
        bounds = [0, inner[0], max(inner[0], inner[1]), rows]
        for tier, start, stop in zip(TIERS, bounds[:-1], bounds[1:], strict=True):
            if stop > start:
                segments.append(Segment(spec.name, tier, start, stop))
        offset += spec.nbytes
    return segments


def _whole_units(specs: list[TensorSpec], cuts: tuple[float, ...]) -> tuple[float, ...]:
    """The cuts moved out of any unit they fall inside, to its nearer end: a unit (consecutive
    tensors of one expert) lives on one tier, so fetching it is one decision. The realized split
    is then within half a unit of the requested one."""
    spans, offset = [], 0
    for spec in specs:
        if spec.unit is not None and spans and spans[-1][0] == spec.unit and spans[-1][2] == offset:
            spans[-1][2] += spec.nbytes
        elif spec.unit is not None:
            spans.append([spec.unit, offset, offset + spec.nbytes])
        offset += spec.nbytes
    moved = []
    for cut in cuts:
        for _, start, stop in spans:
            if start < cut < stop:
                cut = start if cut - start <= stop - cut else stop
                break
        moved.append(cut)
    return tuple(moved)


def assign_units(num_units: int, split: Split) -> list[str]:
    """Assign ``num_units`` equal units (e.g. (layer, micro-batch) KV-cache blocks) to tiers.

    A unit goes to the tier that holds the midpoint of its share of the range, so the realized
    fractions are within ``1 / num_units`` of the requested ones and units of one tier are
    contiguous (layer-major order spreads them evenly over micro-batches).
    """
    bounds = (split.device, split.device + split.host)
    tiers = []
    for u in range(num_units):
        mid = (u + 0.5) / num_units
        tiers.append("device" if mid < bounds[0] else "host" if mid < bounds[1] else "disk")
    return tiers


def segment_bytes(segments: list[Segment], specs: dict[str, TensorSpec]) -> dict[str, int]:
    """Bytes per tier of a list of segments."""
    out = dict.fromkeys(TIERS, 0)
    for seg in segments:
        out[seg.tier] += (seg.stop - seg.start) * specs[seg.name].row_bytes
    return out


@dataclass(frozen=True)
class PlacementReport:
    """Requested vs realized placement of the weights.

    Attributes:
        requested: The policy's weight split.
        bytes_per_tier: Weight bytes actually placed on each tier.
        per_stage: Bytes per tier for each stage (0 = embeddings, 1..L = decoder layers,
            L + 1 = output head).
        plain_bytes: What the same weights take uncompressed, in the compute dtype (equal to
            ``total_bytes`` without weight compression).
        memory: What the model holds besides the weights' own bytes, item by item, set by
            loading (the batch-independent items of memory_model.py).
        in_place_bytes: Disk-tier bytes read in place from the checkpoint's files (not copied
            to the offload directory), set by loading.
    """

    requested: Split
    bytes_per_tier: dict[str, int]
    per_stage: tuple[dict[str, int], ...]
    plain_bytes: int = 0
    memory: Footprint | None = None
    in_place_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_tier.values())

    @property
    def realized(self) -> dict[str, float]:
        """Realized fraction per tier."""
        total = self.total_bytes or 1
        return {t: self.bytes_per_tier[t] / total for t in TIERS}

    @property
    def compression_ratio(self) -> float:
        """Stored bytes / uncompressed bytes (1.0 without weight compression)."""
        return self.total_bytes / self.plain_bytes if self.plain_bytes else 1.0

    def to_dict(self) -> dict:
        return {
            "requested": dict(zip(TIERS, self.requested.fractions, strict=True)),
            "realized": self.realized,
            "bytes_per_tier": dict(self.bytes_per_tier),
            "per_stage": [dict(s) for s in self.per_stage],
            "plain_bytes": self.plain_bytes,
            "memory": self.memory.to_dict() if self.memory is not None else None,
            "in_place_bytes": self.in_place_bytes,
        }

    def __str__(self) -> str:
        lines = [f"{'tier':<8}{'bytes':>12}{'requested':>12}{'realized':>11}"]
        for tier, req in zip(TIERS, self.requested.fractions, strict=True):
            lines.append(
                f"{tier:<8}{human_bytes(self.bytes_per_tier[tier]):>12}"
                f"{req:>12.1%}{self.realized[tier]:>11.1%}"
            )
        lines.append(f"{'total':<8}{human_bytes(self.total_bytes):>12}")
        if self.compression_ratio < 1.0:
            lines.append(
                f"compressed: {self.compression_ratio:.1%} of {human_bytes(self.plain_bytes)}"
            )
        if self.in_place_bytes:
            lines.append(
                f"disk: {human_bytes(self.in_place_bytes)} read in place from the checkpoint "
                f"files, {human_bytes(self.bytes_per_tier['disk'] - self.in_place_bytes)} "
                "written to offload_dir"
            )
        if self.memory is not None:
            lines += ["", "memory the model holds before any batch:", self.memory.table()]
        return "\n".join(lines)
