"""Memory per tier: what this machine has free, caps from ``max_memory``, and the fit check."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .policy import TIERS
from .stats import human_bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class InsufficientMemoryError(MemoryError):
    """A placement needs more bytes on some tier than the tier has."""


def parse_size(value: int | float | str, field: str = "max_memory") -> int:
    """Bytes from ``12GiB``, ``500MB``, ``"1e9"`` or an int."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"Invalid {field}={value!r}: use bytes or a size like '12GiB', '500MB', '2TB'."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_max_memory(max_memory: dict[str, int | str] | None) -> None:
    """Raise if ``max_memory`` has keys other than the tiers or sizes that do not parse."""
    unknown = set(max_memory or {}) - set(TIERS)
    if unknown:
        raise ValueError(
            f"Invalid max_memory keys {sorted(unknown)}: allowed keys are {list(TIERS)}."
        )
    for tier, cap in (max_memory or {}).items():
        parse_size(cap, f"max_memory[{tier!r}]")


@dataclass(frozen=True)
class Capacities:
    """Bytes available per tier.

    Attributes:
        device, host, disk: Capacity of each tier.
        shared: The device *is* host memory (CPU-only): device + host share one budget.
    """

    device: int
    host: int
    disk: int
    shared: bool

    @classmethod
    def measure(
        cls,
        device: torch.device,
        offload_dir: str | None,
        max_memory: dict[str, int | str] | None = None,
    ) -> Capacities:
        """Free memory now, capped by ``max_memory`` (keys ``device``, ``host``, ``disk``)."""
        check_max_memory(max_memory)
        ram = available_ram()
        dev = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram
        probe = offload_dir if offload_dir and os.path.isdir(offload_dir) else tempfile.gettempdir()
        free = shutil.disk_usage(probe).free
        return cls(device=dev, host=ram, disk=free, shared=device.type != "cuda").capped(max_memory)

    def capped(self, max_memory: dict[str, int | str] | None) -> Capacities:
        """These capacities, each at most its ``max_memory`` entry."""
        check_max_memory(max_memory)
        sizes = {t: getattr(self, t) for t in TIERS}
        for tier, cap in (max_memory or {}).items():
            sizes[tier] = min(sizes[tier], parse_size(cap, f"max_memory[{tier!r}]"))
        if self.shared:  # one RAM: a cap on either tier caps both
            sizes["device"] = sizes["host"] = min(sizes["device"], sizes["host"])
        return Capacities(**sizes, shared=self.shared)

    def check(self, needs: dict[str, int], what: str) -> None:
        """Raise ``InsufficientMemoryError`` with a per-tier table if ``needs`` does not fit."""
        over = [t for t in TIERS if needs.get(t, 0) > getattr(self, t)]
        if self.shared and needs.get("device", 0) + needs.get("host", 0) > max(
            self.device, self.host
        ):
            over.append("device+host (the same RAM on this machine)")
        if not over:
            return
        rows = "\n".join(
            f"  {t:<7} needs {human_bytes(needs.get(t, 0)):>10}, "
            f"has {human_bytes(getattr(self, t)):>10}"
            for t in TIERS
        )
        raise InsufficientMemoryError(
            f"{what} does not fit: too much on {', '.join(over)}.\n{rows}\n"
            "Move fractions of the policy to a larger tier (e.g. weights=Split(host=..., "
            "disk=...)), use a smaller batch, or raise max_memory."
        )
