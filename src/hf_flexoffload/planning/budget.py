"""Memory per tier: what this machine has free, caps from ``max_memory``, and the fit check."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ..config.counters import human_bytes
from ..config.policy import TIERS

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class InsufficientMemoryError(MemoryError):
    """A placement needs more bytes on some tier than the tier has."""


def parse_size(value: int | float | str, field: str = "max_memory", allow_zero: bool = True) -> int:
    """Bytes from ``12GiB``, ``500MB``, ``"1e9"`` or a number: finite and not negative (and
    not zero unless ``allow_zero``); the same rules for Python callers and the command line."""
    hint = "use bytes or a size like '12GiB', '500MB', '2TB'"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"Invalid {field}={value!r}: {hint}.")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"Invalid {field}={value!r}: {hint}.")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"Invalid {field}={value!r}: a size must be a finite number >= 0.")
    if number < 1 and not allow_zero:
        raise ValueError(
            f"Invalid {field}={value!r}: nothing can run with no {field.split('[')[-1][:-1]} "
            "memory; give a positive size or leave the tier uncapped."
        )
    return int(number)


def probe_directory(offload_dir: str | None) -> str:
    """The directory whose filesystem stands for the disk tier's: ``offload_dir``, or where it
    will be created (its nearest existing ancestor, when writable: the same filesystem, as
    nothing can be mounted below a directory that does not exist yet), else the temporary
    directory. Planning runs before loading creates ``offload_dir``, so the profile it measures
    (and caches, keyed by this filesystem) is the one a later load with the directory finds."""
    if not offload_dir:
        return tempfile.gettempdir()
    if os.path.isdir(offload_dir):
        return offload_dir
    path = os.path.abspath(offload_dir)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
        return path
    return tempfile.gettempdir()


def available_ram() -> int:
    """Bytes of RAM new allocations can have: the machine's MemAvailable, and no more than the
    container's memory limit leaves (a batch-scheduled or containerized process has only that)."""
    free = _meminfo_available()
    room = cgroup_room()
    return free if room is None else min(free, room)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_CGROUP_ROOT = "/sys/fs/cgroup"
# (limit file, usage file, reclaimable page-cache counter in memory.stat) per cgroup version.
_CGROUP_FILES = {
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    "v2": ("memory.max", "memory.current", "inactive_file"),
}


def cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = _CGROUP_ROOT) -> int | None:
    """Bytes this process's memory cgroups still allow: the smallest ``limit - usage`` over its
    cgroup and every parent (page cache the kernel can drop does not count as used), or None
    when no limit applies.

    Reads cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``).
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            rooms += _rooms(os.path.join(root, "memory"), path, "v1")
        elif controllers == "":
            rooms += _rooms(os.path.join(root, "unified"), path, "v2")
            rooms += _rooms(root, path, "v2")
    return min(rooms) if rooms else None


def _rooms(mount: str, path: str, version: str) -> list[int]:
    limit_file, usage_file, cache_key = _CGROUP_FILES[version]
    out = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        directory = os.path.join(mount, *parts[:depth])
        limit = _read_int(os.path.join(directory, limit_file))
        usage = _read_int(os.path.join(directory, usage_file))
        if limit is None or usage is None or limit >= 2**62:  # "max" or the v1 "no limit" value
            continue
        out.append(max(0, limit - usage + _stat(os.path.join(directory, "memory.stat"), cache_key)))
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


# Allocations from this size up are mapped and unmapped one by one (see ``bound_heap_slack``).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def bound_heap_slack() -> None:
    """Make freed large temporaries go back to the OS at once (glibc only; process-wide).

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    which every temporary below it comes from the heap, and the heap keeps what it frees: over
    a load and a few forward passes that slack grew to 30+ MiB beyond the memory model on a
    100 MB model. A fixed threshold of ``MMAP_THRESHOLD`` stops the growth; the cost is a page
    fault per page of each new large temporary, small next to the matmuls that fill it.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``), so what a finished
    phase freed (loading's chunk buffers, the quantizer's intermediates) stops counting against
    the process's resident set. A no-op where the C library has no such call."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


def check_max_memory(max_memory: dict[str, int | str] | None) -> None:
    """Raise if ``max_memory`` has keys other than the tiers or sizes that do not parse."""
    if max_memory is not None and not isinstance(max_memory, dict):
        raise ValueError(
            f"Invalid max_memory={max_memory!r}: give a dict like {{'host': '8GiB'}} with keys "
            f"{list(TIERS)}."
        )
    unknown = set(max_memory or {}) - set(TIERS)
    if unknown:
        raise ValueError(
            f"Invalid max_memory keys {sorted(unknown)}: allowed keys are {list(TIERS)}."
        )
    for tier, cap in (max_memory or {}).items():
        parse_size(cap, f"max_memory[{tier!r}]", allow_zero=tier != "host")


@dataclass(frozen=True, kw_only=True)
class AllocatorState:
    """One CUDA device's memory as the driver and torch's caching allocator report it.

    Attributes:
        free, total: The driver's free and total bytes (``torch.cuda.mem_get_info``). ``free``
            excludes everything this process's allocator has reserved, in use or not.
        reserved: Bytes the caching allocator holds (``torch.cuda.memory_reserved``).
        allocated: Bytes of those in live tensors (``torch.cuda.memory_allocated``).
        fraction: The cap ``torch.cuda.set_per_process_memory_fraction`` set on what this
            process may reserve, as a share of ``total`` (1.0: none).
    """

    free: int
    total: int
    reserved: int = 0
    allocated: int = 0
    fraction: float = 1.0

    @classmethod
    def read(cls, device: torch.device) -> AllocatorState:
        if device.index is None:  # "cuda": the fraction getter refuses a device without index
            device = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        # Reading the fraction back is a newer API; without it no cap can be known (1.0).
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return cls(
            free=free,
            total=total,
            reserved=torch.cuda.memory_reserved(device),
            allocated=torch.cuda.memory_allocated(device),
            fraction=1.0 if getter is None else float(getter(device)),
        )


def device_capacity(state: AllocatorState) -> int:
    """Bytes new tensors on a CUDA device can get.

    The driver's free bytes plus the blocks the caching allocator reserved but no tensor uses
    (after one ``generate`` they hold the freed cache and workspace: the allocator reuses them,
    and releases them to retry a failed ``cudaMalloc``), and no more than the per-process cap
    leaves: the allocator refuses to reserve past ``fraction * total``, and what live tensors
    hold is inside that reservation.

    Example:
        >>> device_capacity(AllocatorState(free=10, total=100, reserved=50, allocated=20))
        40
    """
    reusable = max(0, state.reserved - state.allocated)
    cap = int(state.fraction * state.total) - state.allocated
    return max(0, min(state.free + reusable, cap))


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
        """Memory new allocations can get now, capped by ``max_memory`` (keys ``device``,
        ``host``, ``disk``). On CUDA: ``device_capacity`` of the allocator's state, so what
        the process's own live tensors hold is not counted (callers add back what they own)."""
        check_max_memory(max_memory)
        ram = available_ram()
        dev = device_capacity(AllocatorState.read(device)) if device.type == "cuda" else ram
        free = shutil.disk_usage(probe_directory(offload_dir)).free
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

    def check(self, needs: dict[str, int], what: str, detail: str = "") -> None:
        """Raise ``InsufficientMemoryError`` with a per-tier table if ``needs`` does not fit.

        Args:
            detail: Where the bytes go (``Footprint.table()``), added to the message.
        """
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
        detail = f"Where it goes:\n{detail}\n" if detail else ""
        raise InsufficientMemoryError(
            f"{what} does not fit: too much on {', '.join(over)}.\n{rows}\n{detail}"
            "Move fractions of the policy to a larger tier (e.g. weights=Split(host=..., "
            "disk=...)), use a smaller batch, or raise max_memory."
        )
