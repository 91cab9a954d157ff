"""Measuring this machine: the timed probes behind ``HardwareProfile.measure``.

Each probe runs the operation the runtime runs (streamed matmuls at the model's shape, strided
decode attention, 4-bit dequantization, positional reads of offload files) and reports the best
of a few runs, since on a shared machine noise only ever makes a run slower.
"""

from __future__ import annotations

import logging
import os
import platform
import time

import torch
import torch.nn.functional as F

from ..formats.compression import QuantConfig, dequantize, quantize
from ..storage.disk_file import DiskFile
from ..storage.tier_store import dtype_name
from ..storage.transfer import PinnedHost
from .int4_kernel_choice import KERNEL_PROBE_ROWS, crossover, kernel_rates
from .overlap_probe import measure_overlap
from .probe_timing import timed, timed_each

logger = logging.getLogger(__name__)

MATMUL_ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
# Row counts whose timed call would take longer than this reuse the last measured rate.
MATMUL_CALL_SECONDS = 5.0
_DISK_PROBE_BYTES = 256 * 2**20
_STREAM_BYTES = 512 * 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


# -- measurements ------------------------------------------------------------------------------


def measure_rates(
    device: torch.device, dtype: torch.dtype, matrix: tuple[int, int], probe_dir: str
) -> dict:
    torch.manual_seed(0)
    rates: dict = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": dtype_name(dtype),
        "matrix": list(matrix),
    }
    steps = [
        ("matmul rates", lambda: {"matmul_flops": _matmul(device, dtype, matrix)}),
        ("copy bandwidths", lambda: _copy_bandwidth(device)),
        ("attention", lambda: _attention_rates(device, dtype)),
        ("dequantizing", lambda: {"dequantize_bytes": _dequantize(device, dtype, matrix)}),
        ("the int4 kernel", lambda: _int4_rates(device, dtype, matrix)),
        ("per-op overhead", lambda: {"op_seconds": _op_overhead(device)}),
        (f"the disk under {probe_dir}", lambda: _disk(probe_dir, device, dtype, matrix)),
    ]
    for i, (what, probe) in enumerate(steps, 1):
        # Progress, a line per probe: the CLI shows these while the first run measures.
        logger.info("measuring %d/%d: %s", i, len(steps), what)
        rates.update(probe())
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' blocks back to the driver (and other processes)
    return rates


def _attention_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    host = _attention(torch.device("cpu"), dtype)
    on_device = _attention(device, dtype) if device.type == "cuda" else host
    return {"attention_bytes": host, "device_attention_bytes": on_device}


def _int4_rates(device: torch.device, dtype: torch.dtype, matrix: tuple[int, int]) -> dict:
    kernel, dequantizing = kernel_rates(device, dtype, matrix, KERNEL_PROBE_ROWS)
    return {"int4_matmul_flops": kernel, "int4_kernel_rows": crossover(kernel, dequantizing)}


def _matmul(device: torch.device, dtype: torch.dtype, matrix: tuple[int, int]) -> dict[int, float]:
    """FLOP/s by row count, over a decoder layer's matrices: four (hidden, hidden) and the
    (hidden, ffn) pair both ways, as ``F.linear`` with biases. The runtime streams every layer's
    weights from memory once per step, so the layers rotate over more bytes than any cache holds
    (a single matrix re-used would be served from a large L3 and look faster than a real layer).
    """
    hidden, ffn = matrix
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]  # (out, in)
    layer_bytes = sum(o * i for o, i in shapes) * dtype.itemsize
    count = max(2, min(64, -(-_STREAM_BYTES // layer_bytes)))
    layers = [
        [
            (torch.randn(o, i, device=device).to(dtype), torch.randn(o, device=device).to(dtype))
            for o, i in shapes
        ]
        for _ in range(count)
    ]
    flops_per_row = 2 * sum(o * i for o, i in shapes) * count

    def run(inputs: dict[int, torch.Tensor]) -> None:
        for layer in layers:
            for w, b in layer:  # (out, in), (out,)
                F.linear(inputs[w.shape[1]], w, b)

    out: dict[int, float] = {}
    for rows in MATMUL_ROWS:
        if out and rows * flops_per_row / out[max(out)] > MATMUL_CALL_SECONDS:
            # Large row counts on a large matrix with slow matmuls (bf16 on an AVX2 CPU: a
            # 13B layer pair at 1024 rows takes minutes) would make the first profile take
            # tens of minutes. By then the matmul is compute-bound: keep the last rate.
            out[rows] = out[max(out)]
            continue
        inputs = {d: torch.randn(rows, d, device=device).to(dtype) for d in {hidden, ffn}}
        seconds = timed(lambda x=inputs: run(x), device, repeats=2 if rows > 64 else 3)
        out[rows] = rows * flops_per_row / seconds
    return out


def _copy_bandwidth(device: torch.device) -> dict[str, float]:
    nbytes = 128 * 2**20
    if device.type != "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
        target = torch.empty_like(host)
        rate = nbytes / timed(lambda: target.copy_(host), device)
        return {"host_to_device": rate, "device_to_host": rate}
    # Pinned as the host tier is: ``pin_memory=True`` would leave 128 MiB page-locked in torch's
    # caching host allocator for the rest of the process, outside every budget.
    pinned = PinnedHost(device)
    try:
        host = pinned.empty((nbytes,), torch.uint8).random_(0, 255)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        h2d = nbytes / timed(lambda: dev.copy_(host, non_blocking=True), device)
        d2h = nbytes / timed(lambda: host.copy_(dev, non_blocking=True), device)
    finally:
        torch.cuda.synchronize(device)
        pinned.release()
    return {"host_to_device": h2d, "device_to_host": d2h}


def _attention(device: torch.device, dtype: torch.dtype) -> float:
    """Decode attention throughput in KV bytes/s: 8 sequences, 16 heads of 64, 1024 tokens."""
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # host attention upcasts fp16, as KVUnit.attend does
    b, heads, d, length = 8, 16, 64, 1024
    q = torch.randn(b, heads, 1, d, device=device).to(dtype)
    kv = torch.randn(2, length, b, heads, d, device=device).to(dtype)
    keys, values = kv[0].permute(1, 2, 0, 3), kv[1].permute(1, 2, 0, 3)  # (b, H, S, d) views
    bias = torch.zeros(b, 1, 1, length, device=device, dtype=dtype)
    seconds = timed_each(
        lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=bias), device
    )
    return kv.numel() * kv.element_size() / seconds


def _dequantize(device: torch.device, dtype: torch.dtype, matrix: tuple[int, int]) -> float:
    weight = torch.randn(matrix[1], matrix[0], device=device).to(dtype)
    # The default format; min-max rounding keeps the probe quick and dequantizes at the same cost.
    q = quantize(weight, QuantConfig(rounding="minmax"))
    out = torch.empty_like(weight)
    seconds = timed_each(lambda: dequantize(q, out=out), device)
    return weight.numel() * weight.element_size() / seconds


def _op_overhead(device: torch.device) -> float:
    x = torch.zeros(8, 8, device=device)
    n = 200

    def ops() -> None:
        y = x
        for _ in range(n):
            y = y + 1

    return timed(ops, device) / n


def _disk(
    directory: str, device: torch.device, dtype: torch.dtype, matrix: tuple[int, int]
) -> dict[str, float]:
    """Cold and cached read, and write (with fsync), of a 256 MiB file under ``directory``; and
    how well a cached read overlaps with a matmul."""
    path = os.path.join(directory, f".hf_flexoffload-disk-probe-{os.getpid()}")
    data = torch.empty(_DISK_PROBE_BYTES, dtype=torch.uint8)
    data.random_(0, 255)
    out = torch.empty_like(data)
    f = DiskFile(path, create=True)
    try:
        start = time.perf_counter()
        f.write(0, data)
        os.fsync(f.fileno())
        write = _DISK_PROBE_BYTES / (time.perf_counter() - start)
        cold_times = []
        for _ in range(2):
            _drop_cached(f.fileno())
            start = time.perf_counter()
            f.read_into(0, out)
            cold_times.append(time.perf_counter() - start)
        cached = _DISK_PROBE_BYTES / timed(lambda: f.read_into(0, out), torch.device("cpu"), 3)
        penalty = measure_overlap(f, device, dtype, matrix)
        direct = DiskFile(path, direct=True)
        try:
            # Direct reads are DMA into the buffer: they may overlap where cached copies do not.
            direct_penalty = (
                measure_overlap(direct, device, dtype, matrix, max_steps=8)
                if direct.direct
                else None
            )
        finally:
            direct.close()
    finally:
        f.close()
        os.remove(path)
    cold = _DISK_PROBE_BYTES / min(cold_times)
    return {
        "disk_read": min(cold, cached),
        "disk_write": write,
        "cached_disk_read": cached,
        "overlap_penalty": penalty,
        "direct_overlap_penalty": direct_penalty,
    }


def _drop_cached(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
