"""Memory per tier: what this machine has, what a placement needs, and the simple auto policy.

``offload_policy="auto"`` uses ``heuristic_policy`` until the cost-model optimizer lands: it keeps
as many weights in fast memory as fit in half of what is free and puts the rest on disk (see
docs/concepts.md).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .policy import TIERS, Policy, Split
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
        caps = dict(max_memory or {})
        unknown = set(caps) - set(TIERS)
        if unknown:
            raise ValueError(
                f"Invalid max_memory keys {sorted(unknown)}: allowed keys are {list(TIERS)}."
            )
        ram = available_ram()
        dev = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram
        probe = offload_dir if offload_dir and os.path.isdir(offload_dir) else tempfile.gettempdir()
        measured = {"device": dev, "host": ram, "disk": shutil.disk_usage(probe).free}
        for tier, cap in caps.items():
            measured[tier] = min(measured[tier], parse_size(cap, f"max_memory[{tier!r}]"))
        return cls(**measured, shared=device.type != "cuda")

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


def heuristic_policy(weight_bytes: int, caps: Capacities, device: torch.device) -> Policy:
    """The documented stand-in for the optimizer.

    Weights: all on the device if they fit in 60% of its free memory; otherwise the device takes
    what fits in 50% of it, host RAM (on CUDA machines) takes what fits in 50% of its free memory,
    and the rest goes to disk. KV cache and activations stay on the device when weights fit there
    and go to host RAM otherwise. Blocks: 4 micro-batches of 8 on CUDA, 2 of 16 on CPU.
    """
    w = max(weight_bytes, 1)
    if weight_bytes <= 0.6 * caps.device:
        weights = Split(device=1.0)
    else:
        on_device = min(1.0, 0.5 * caps.device / w)
        on_host = 0.0 if caps.shared else min(1.0 - on_device, 0.5 * caps.host / w)
        on_device, on_host = round(on_device, 4), round(on_host, 4)
        weights = Split(device=on_device, host=on_host, disk=round(1.0 - on_device - on_host, 4))
    cache = Split(device=1.0) if weights.device == 1.0 or caps.shared else Split(host=1.0)
    cuda = device.type == "cuda"
    return Policy(
        micro_batch_size=8 if cuda else 16,
        num_micro_batches=4 if cuda else 2,
        weights=weights,
        cache=cache,
        activations=Split(device=1.0),
        overlap=True,
        host_attention=True,
    )
