"""What a run moved and held, counted in bytes, and byte counts written for people.

Every layer that allocates or moves bytes reports into one ``Counters``; the per-generate
summary (``GenerationStats``) and the placement report read them.
"""

from __future__ import annotations

import threading

from .policy import TIERS

LINKS = ("disk_to_host", "host_to_device", "device_to_host", "host_to_disk")


class Counters:
    """Thread-safe byte counters: bytes moved per link and live/peak bytes per tier.

    I/O runs in background threads, so every update takes a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.moved = dict.fromkeys(LINKS, 0)
        self.live = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.stage_loads: dict[int, int] = {}
        # Mixture of experts, per run: (layer, expert) pairs routed to, and the bytes of those
        # not in compute memory (what routed-only fetching reads); since load (or
        # reset_expert_tokens): per decoder layer, the (token, slot) pairs routed to each expert.
        self.routed = {"experts": 0, "bytes": 0}
        self.expert_tokens: dict[int, dict[int, int]] = {}

    def count_routed(self, layer: int, experts: list[int], tokens: list[int], nbytes: int) -> None:
        with self._lock:
            self.routed["experts"] += len(experts)
            self.routed["bytes"] += nbytes
            counts = self.expert_tokens.setdefault(layer, {})
            for e, n in zip(experts, tokens, strict=True):
                counts[e] = counts.get(e, 0) + n

    def reset_expert_tokens(self) -> None:
        with self._lock:
            self.expert_tokens = {}

    def add_moved(self, link: str, nbytes: int) -> None:
        with self._lock:
            self.moved[link] += nbytes

    def alloc(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.live[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.live[tier])

    def free(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.live[tier] -= nbytes

    def count_stage_load(self, stage: int) -> None:
        with self._lock:
            self.stage_loads[stage] = self.stage_loads.get(stage, 0) + 1

    def reset_run(self) -> None:
        """Start a new measurement window: moved bytes and loads to zero, peaks to what is live."""
        with self._lock:
            self.moved = dict.fromkeys(LINKS, 0)
            self.peak = dict(self.live)
            self.stage_loads = {}
            self.routed = {"experts": 0, "bytes": 0}


def human_bytes(nbytes: float) -> str:
    """Format a byte count for people: ``1.5GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}GiB"
