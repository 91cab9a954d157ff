"""How often a mixture-of-experts model routed tokens to each expert: a calibration's result.

A model counts, per sparse layer, the (token, slot) pairs routed to each expert while it runs
(``model.expert_usage()``). Loaded with that usage (``from_pretrained(expert_usage=...)``), each
layer's experts are placed most used first, so the ones kept resident are those tokens reach most
and the slower tiers hold the rarely used ones; the planner then expects hits from the measured
shares instead of uniform routing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .validation import fields_of, require


@dataclass(frozen=True, kw_only=True)
class ExpertUsage:
    """Routed (token, slot) pairs per expert, per decoder layer.

    Args:
        counts: One entry per decoder layer: the pairs routed to each of its experts, in expert
            order, or an empty tuple for a dense layer.

    Example:
        >>> usage = ExpertUsage(counts=((5, 1, 0, 2), ()))
        >>> usage.order(0), usage.shares(0, top_k=2)
        ((0, 3, 1, 2), (1.25, 0.25, 0.0, 0.5))
    """

    counts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        counts = tuple(tuple(layer) for layer in self.counts)
        object.__setattr__(self, "counts", counts)
        ok = all(type(c) is int and c >= 0 for layer in counts for c in layer)
        require(ok, "ExpertUsage.counts", self.counts, "counts must be integers >= 0")
        require(
            any(sum(layer) > 0 for layer in counts),
            "ExpertUsage.counts",
            self.counts,
            "no token was routed: run the model on calibration prompts first",
        )

    def order(self, layer: int) -> tuple[int, ...]:
        """Layer ``layer``'s experts, most used first (ties: lower index first)."""
        counts = self.counts[layer]
        return tuple(sorted(range(len(counts)), key=lambda e: (-counts[e], e)))

    def shares(self, layer: int, top_k: int) -> tuple[float, ...]:
        """Per expert of layer ``layer``, the probability that a token routes to it (they sum
        to ``top_k``)."""
        counts = self.counts[layer]
        tokens = sum(counts) / top_k
        return tuple(c / tokens if tokens else 0.0 for c in counts)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": [list(layer) for layer in self.counts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertUsage:
        kwargs = fields_of(cls, data)
        counts = kwargs.get("counts")
        ok = isinstance(counts, list) and all(isinstance(c, list) for c in counts)
        require(ok, "ExpertUsage.counts", counts, "a list (per layer) of lists of counts")
        return cls(counts=tuple(tuple(layer) for layer in counts))

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (atomically: a reader never sees half a file)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertUsage:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def resolve_usage(usage: ExpertUsage | str | os.PathLike | None) -> ExpertUsage | None:
    """An ``ExpertUsage`` from one, or from the path of its JSON."""
    if usage is None or isinstance(usage, ExpertUsage):
        return usage
    if isinstance(usage, (str, os.PathLike)) and os.path.isfile(usage):
        return ExpertUsage.load(usage)
    raise ValueError(
        f"Invalid expert_usage={usage!r}: pass an ExpertUsage (model.expert_usage()) or the path "
        "of the JSON file ExpertUsage.save wrote."
    )
