"""The compute device of a benchmark run: one device for every system compared, a GPU-memory
cap, and the memory peaks the tables report (GPU allocator, pinned host memory).

Every benchmark takes ``--device``; stock transformers, accelerate and ours all run there, so a
table never compares a GPU with a CPU. On CUDA a cap (``--device-cap``, e.g. a 16 GiB card on
a larger GPU) is imposed with ``torch.cuda.set_per_process_memory_fraction`` in each run's
process, so torch's allocator refuses what such a card could not hold. Peaks are read after
``reset_peak_memory_stats``; on the CPU there is no separate device memory and the columns say
n/a.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessor

from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size

NA = "n/a"
# The keys of a peaks dict (None where this device or this torch has no such counter).
PEAK_KEYS = ("device_allocated_peak", "device_reserved_peak", "pinned_host_peak")


def add_device_arguments(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    """``--device`` and ``--device-cap`` (CUDA only), as every benchmark spells them."""
    parser.add_argument(
        "--device",
        default=default,
        help="compute device of every compared system: cpu, cuda or cuda:N (default %(default)s)",
    )
    parser.add_argument(
        "--device-cap",
        type=parse_size,
        default=None,
        help="CUDA: GPU memory this run may use, e.g. 16GiB (torch's per-process fraction)",
    )


def resolve(name: str | torch.device) -> torch.device:
    """``name`` as a device with an index (``cuda`` is ``cuda:0``); a clear error when CUDA is
    asked for and there is none."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device.")
        return torch.device("cuda", 0 if device.index is None else device.index)
    return device


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def describe(device: torch.device) -> str:
    """The device's name for a table header."""
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {human_bytes(props.total_memory)})"
    return str(device)


def cap_memory(device: torch.device, cap: int | None) -> float | None:
    """Limit this process's CUDA allocations on ``device`` to ``cap`` bytes; the fraction set,
    or None (no cap, or not CUDA: the CPU has no device memory of its own to cap)."""
    if cap is None or not is_cuda(device):
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def accelerate_max_memory(device: torch.device, device_bytes: int | None, host_bytes: int) -> dict:
    """accelerate's ``max_memory`` for a run on ``device``: the GPU (by index) and the CPU; on
    the CPU only the CPU, so accelerate offloads what does not fit to its folder on disk."""
    if is_cuda(device):
        gpu = device_bytes if device_bytes is not None else torch.cuda.mem_get_info(device)[0]
        return {device.index: int(gpu), "cpu": int(host_bytes)}
    return {"cpu": int(host_bytes)}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (nothing to wait for on CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


class FirstToken(LogitsProcessor):
    """Records when the first logits exist, the end of the prefill (the GPU synchronized: its
    work is queued ahead of the host)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            synchronize(self.device)
            self.at = time.perf_counter()
        return scores


class Margins(LogitsProcessor):
    """Records, per step and row, how far the chosen logit is ahead of the next: where two
    systems' greedy tokens part, small margins on both sides mean a near-tie that kernel
    differences decide (not a wrong result). Kept on the device until ``rows``: no sync."""

    def __init__(self) -> None:
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        top = scores.float().topk(2, dim=-1).values
        self._steps.append(top[:, 0] - top[:, 1])
        return scores

    def rows(self) -> list[list[float]]:
        """[row][step] margins."""
        if not self._steps:
            return []
        return torch.stack(self._steps, dim=1).cpu().tolist()


def reset_peaks(device: torch.device) -> None:
    """Start a new peak window for ``peaks``."""
    if not is_cuda(device):
        return
    torch.cuda.reset_peak_memory_stats(device)
    reset_host = getattr(torch.cuda.memory, "reset_peak_host_memory_stats", None)
    if reset_host is not None:
        reset_host()


def peaks(device: torch.device) -> dict[str, int | None]:
    """GPU allocated and reserved peaks and pinned host peak since ``reset_peaks``; None where
    there is no such counter (CPU, or a torch without host-allocator statistics)."""
    if not is_cuda(device):
        return dict.fromkeys(PEAK_KEYS)
    return {
        "device_allocated_peak": torch.cuda.max_memory_allocated(device),
        "device_reserved_peak": torch.cuda.max_memory_reserved(device),
        "pinned_host_peak": pinned_host_peak(),
    }


def pinned_host_peak() -> int | None:
    """Peak bytes of torch's caching pinned-host allocator (``pin_memory=True`` tensors), where
    this torch reports it. Memory pinned with ``cudaHostRegister`` (ours' host weight tier) is
    not in it: ``registered_host_bytes`` reads that from the model."""
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats is None:
        return None
    try:
        values = stats()
    except RuntimeError:  # a CPU-only build
        return None
    return values.get("allocated_bytes.peak")


def registered_host_bytes(model) -> int | None:
    """Bytes ours page-locked at their exact size (the host weight tier), if ``model`` is ours
    and this version counts them."""
    pinned = getattr(getattr(getattr(model, "engine", None), "store", None), "pinned", None)
    return getattr(pinned, "pinned_bytes", None)


def fmt(nbytes: int | float | None) -> str:
    """Bytes for a table cell; n/a where not measured."""
    return NA if nbytes is None else human_bytes(nbytes)


def peak_cells(result: dict) -> list[str]:
    """The GPU allocated / reserved and pinned-host peak cells of one result."""
    return [fmt(result.get(key)) for key in PEAK_KEYS]


PEAK_HEADER = "GPU peak allocated | GPU peak reserved | pinned host peak"
