"""What this machine can hold and how fast it moves and computes: the ``HardwareProfile``.

The rates (bandwidths, matmul and attention throughput, dequantization speed, per-op overhead)
take a few seconds to measure and do not change, so ``HardwareProfile.measure`` caches them in a
JSON file keyed by the machine, the compute device, the dtype, the model's matrix shape and the
filesystem of the offload directory. Capacities (free memory and disk) do change, so they are
read again on every call and capped by ``max_memory``.

Disk reads are measured twice: cold (the file's pages dropped from the page cache with
``posix_fadvise(DONTNEED)`` after an ``fsync``) and cached (the same file read again). The cost
model uses the cached rate only for disk bytes that fit in the RAM nobody has claimed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..config.policy import TIERS
from ..storage.tier_store import dtype_name
from .budget import Capacities, probe_directory
from .overlap_probe import MAX_OVERLAP_PENALTY
from .probes import cpu_name, device_name, measure_rates

logger = logging.getLogger(__name__)

PROFILE_VERSION = 9  # 8: cpu_capability; 9: the int4 kernel's rates
# Fields that are not a rate or capacity (>= 0): checked on their own or not at all.
_NOT_RATES = {"device", "device_name", "dtype", "cpu_capability", "shared", "matrix"}
_ROW_RATES = ("matmul_flops", "int4_matmul_flops")  # {rows: FLOP/s}


def default_cache_dir() -> str:
    """``$HF_FLEXOFFLOAD_CACHE``, else ``$XDG_CACHE_HOME/hf_flexoffload`` (``~/.cache``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("HF_FLEXOFFLOAD_CACHE") or os.path.join(xdg, "hf_flexoffload")


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Capacities and measured rates of one machine, for one compute device and dtype.

    Attributes:
        device: The compute device, e.g. ``"cpu"`` or ``"cuda:0"``.
        device_name: What it is (CPU model or GPU name).
        dtype: Compute dtype the rates were measured in.
        shared: The device *is* host memory (CPU-only): device + host share one budget and
            host→device moves are free.
        device_memory, host_memory, disk_space: Capacities in bytes (free now, capped by
            ``max_memory``).
        ram_available: RAM available to the OS now, never capped: bounds what the page cache
            can keep of the disk tier.
        host_to_device, device_to_host: Link bandwidths, bytes/s (memory copy speed on CPU).
        disk_read, disk_write: Cold disk bandwidths under the offload directory, bytes/s.
        cached_disk_read: Reading offload files that are in the page cache, bytes/s.
        matmul_flops: ``{rows: FLOP/s}`` of ``F.linear`` on the model's matrix shape.
        attention_bytes: Decode attention throughput on the host, bytes of KV history per s.
        device_attention_bytes: The same on the compute device.
        dequantize_bytes: 4-bit dequantization on the device, output bytes per s.
        op_seconds: Time of one small torch op (Python and dispatch overhead).
        overlap_penalty: How much of the shorter of two concurrent tasks (matmuls on one
            staging buffer while a thread reads the next weights into the other; on CUDA, GEMMs
            on the compute stream while a thread reads into pinned staging and copies to the
            device on a side stream) still adds to the longer one's time: 0 for perfect
            overlap, 1 for none, up to 2 when the tasks slow each other (more busy threads
            than cores: overlapping is then slower than running in turn).
        direct_overlap_penalty: The same with ``O_DIRECT`` reads (``None`` where the offload
            directory's filesystem has no O_DIRECT): policies with ``direct_io`` use it.
        matrix: The (in, out) shape the matmul rates were measured on.
        cpu_capability: The host CPU's vector instruction set as torch uses it (``AVX2``,
            ``AVX512``...): whether bf16 matmuls are fast there depends on it.
        int4_matmul_flops: ``{rows: FLOP/s}`` of the CPU int4 kernel on 4-bit weights in its
            layout (``int4_tiled``), on the (out, in) layer matrix; empty where it cannot run.
        int4_kernel_rows: Rows up to which that kernel beat dequantizing + ``F.linear``.
    """

    device: str
    device_name: str
    dtype: str
    shared: bool
    device_memory: int
    host_memory: int
    disk_space: int
    ram_available: int
    host_to_device: float
    device_to_host: float
    disk_read: float
    disk_write: float
    cached_disk_read: float
    matmul_flops: dict[int, float]
    attention_bytes: float
    device_attention_bytes: float
    dequantize_bytes: float
    op_seconds: float
    overlap_penalty: float
    matrix: tuple[int, int]
    direct_overlap_penalty: float | None = None
    cpu_capability: str = ""
    int4_matmul_flops: dict[int, float] = field(default_factory=dict)
    int4_kernel_rows: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_RATES or f.name in _ROW_RATES:
                continue
            if f.name == "direct_overlap_penalty" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Invalid HardwareProfile.{f.name}={value!r}: must be >= 0.")
        for name in ("overlap_penalty", "direct_overlap_penalty"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= MAX_OVERLAP_PENALTY:
                raise ValueError(
                    f"Invalid HardwareProfile.{name}={value!r}: must be between 0 and "
                    f"{MAX_OVERLAP_PENALTY}."
                )
        if not self.matmul_flops or min(self.matmul_flops.values()) <= 0:
            raise ValueError(
                f"Invalid HardwareProfile.matmul_flops={self.matmul_flops!r}: needs at least one "
                "positive {rows: FLOP/s} entry."
            )
        for name in _ROW_RATES:
            rates = getattr(self, name)
            object.__setattr__(self, name, {int(k): float(v) for k, v in sorted(rates.items())})
        object.__setattr__(self, "matrix", tuple(self.matrix))

    # -- use -----------------------------------------------------------------------------------

    @property
    def capacities(self) -> Capacities:
        return Capacities(
            device=self.device_memory,
            host=self.host_memory,
            disk=self.disk_space,
            shared=self.shared,
        )

    def capacity(self, tier: str) -> int:
        return {"device": self.device_memory, "host": self.host_memory, "disk": self.disk_space}[
            tier
        ]

    def matmul_rate(self, rows: float) -> float:
        """FLOP/s of a matmul with ``rows`` input rows, interpolated in log-log space."""
        return _interpolate(self.matmul_flops, rows)

    def int4_rate(self, rows: float) -> float:
        """FLOP/s of the int4 kernel at ``rows`` (the dense rate where it was not measured)."""
        if not self.int4_matmul_flops:
            return self.matmul_rate(rows)
        return _interpolate(self.int4_matmul_flops, rows)

    def with_caps(self, max_memory: dict[str, int | str] | None) -> HardwareProfile:
        """This profile with capacities capped by ``max_memory`` (keys device, host, disk)."""
        caps = self.capacities.capped(max_memory)
        return replace(self, device_memory=caps.device, host_memory=caps.host, disk_space=caps.disk)

    # -- measure -------------------------------------------------------------------------------

    @classmethod
    def measure(
        cls,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        offload_dir: str | None = None,
        matrix: tuple[int, int] = (2048, 8192),
        max_memory: dict[str, int | str] | None = None,
        cache_dir: str | None = None,
        force: bool = False,
    ) -> HardwareProfile:
        """Measure this machine (or reuse the cached rates) and read its free capacities.

        Args:
            device: The compute device.
            dtype: The compute dtype (matmul rates depend on it).
            offload_dir: Where the disk tier will be (its filesystem is measured).
            matrix: (in, out) features of the model's largest matmul, e.g. (hidden, ffn).
            max_memory: Caps per tier, e.g. ``{"host": "8GiB"}``.
            cache_dir: Where profiles are cached; default ``default_cache_dir()/profiles``.
            force: Measure again even when a cached profile exists.

        Returns:
            The profile, capacities capped by ``max_memory``.

        Example:
            >>> profile = HardwareProfile.measure("cpu", torch.float32, max_memory={"host": "8GiB"})
            >>> profile.matmul_rate(32) / 1e9  # GFLOP/s at 32 rows
        """
        device = torch.device(device)
        probe_dir = probe_directory(offload_dir)
        caps = Capacities.measure(device, probe_dir, None)
        key = _machine_key(device, dtype, matrix, probe_dir)
        path = os.path.join(cache_dir or os.path.join(default_cache_dir(), "profiles"), key)
        rates = None if force else _read_cached(path)
        if rates is None:
            logger.warning(
                "Measuring this machine once for %s %s (matmuls at %dx%d, memory and disk "
                "bandwidths under %s): this takes about 30 s to 2 min; later runs reuse %s.",
                device, str(dtype).removeprefix("torch."), *matrix, probe_dir, path,
            )  # fmt: skip
            start = time.perf_counter()
            rates = measure_rates(device, dtype, matrix, probe_dir)
            logger.info("Measured the hardware profile in %.1fs", time.perf_counter() - start)
            _write_cached(path, rates)
        profile = cls(
            **rates,
            device_memory=caps.device,
            host_memory=caps.host,
            disk_space=caps.disk,
            ram_available=caps.host,
            shared=caps.shared,
        )
        return profile.with_caps(max_memory)

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in _ROW_RATES:
            data[name] = {str(k): v for k, v in getattr(self, name).items()}
        data["matrix"] = list(self.matrix)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown HardwareProfile fields {sorted(unknown)}.")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        """A human-readable summary (the CLI prints it)."""
        gb = 1e9
        slower = ": overlapping is slower than running in turn"
        rows = ", ".join(f"{r}: {f / gb:.0f}" for r, f in self.matmul_flops.items())
        caps = ", ".join(f"{t} {self.capacity(t) / 2**30:.1f} GiB" for t in TIERS)
        return "\n".join(
            [
                f"device         {self.device} ({self.device_name}), compute dtype {self.dtype}"
                + (f", CPU capability {self.cpu_capability}" if self.cpu_capability else "")
                + (", shares host RAM" if self.shared else ""),
                f"capacity       {caps}",
                f"matmul         GFLOP/s by rows {{{rows}}} on {self.matrix[0]}x{self.matrix[1]}",
                f"links          host->device {self.host_to_device / gb:.1f} GB/s, "
                f"device->host {self.device_to_host / gb:.1f} GB/s",
                f"disk           read {self.disk_read / gb:.2f} GB/s cold, "
                f"{self.cached_disk_read / gb:.2f} GB/s cached; "
                f"write {self.disk_write / gb:.2f} GB/s",
                f"attention      host {self.attention_bytes / gb:.1f} GB/s of KV, "
                f"device {self.device_attention_bytes / gb:.1f} GB/s",
                f"dequantize     {self.dequantize_bytes / gb:.1f} GB/s (output)",
                self._describe_int4(),
                f"op overhead    {self.op_seconds * 1e6:.1f} us",
                f"overlap        {self.overlap_penalty:.0%} of the shorter task still adds "
                "(compute next to a cached read)" + (slower if self.overlap_penalty > 1 else ""),
            ]
            + (
                []
                if self.direct_overlap_penalty is None
                else [
                    f"               {self.direct_overlap_penalty:.0%} next to a direct (O_DIRECT) "
                    "read" + (slower if self.direct_overlap_penalty > 1 else "")
                ]
            )
        )

    def _describe_int4(self) -> str:
        if not self.int4_matmul_flops:
            return "int4 kernel    not available here"
        rows = ", ".join(f"{r}: {f / 1e9:.0f}" for r, f in self.int4_matmul_flops.items())
        return (
            f"int4 kernel    GFLOP/s by rows {{{rows}}}; beats dequantizing up to "
            f"{self.int4_kernel_rows} rows"
        )

    def penalty_for(self, direct_io: bool) -> float:
        """The overlap penalty a policy sees: direct reads' where it reads directly."""
        if direct_io and self.direct_overlap_penalty is not None:
            return self.direct_overlap_penalty
        return self.overlap_penalty


# -- cache -------------------------------------------------------------------------------------


def _machine_key(
    device: torch.device, dtype: torch.dtype, matrix: tuple[int, int], probe_dir: str
) -> str:
    parts = {
        "version": PROFILE_VERSION,
        "node": platform.node(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "matrix": list(matrix),
        "filesystem": os.stat(probe_dir).st_dev,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{device.type}-{dtype_name(dtype)}-{digest}.json"


def _read_cached(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("version") != PROFILE_VERSION:
        return None
    rates = data["rates"]
    for name in _ROW_RATES:
        rates[name] = {int(k): v for k, v in rates.get(name, {}).items()}
    return rates


def _write_cached(path: str, rates: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    data = {"version": PROFILE_VERSION, "rates": rates}
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=list)
    os.replace(tmp, path)


def _interpolate(rates: dict[int, float], rows: float) -> float:
    """A rate at ``rows`` from ``{rows: rate}``, interpolated in log-log space (linear in the
    rows below the smallest measured count, flat above the largest)."""
    points = sorted(rates.items())
    rows = max(1.0, rows)
    if rows <= points[0][0]:
        return points[0][1] * rows / points[0][0]
    if rows >= points[-1][0]:
        return points[-1][1]
    for (r0, f0), (r1, f1) in itertools.pairwise(points):
        if r0 <= rows <= r1:
            t = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return f0 ** (1 - t) * f1**t
    return points[-1][1]
