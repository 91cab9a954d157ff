"""Host buffers and devices, without CUDA: the compute device, page-aligned host tensors for
direct disk reads. ``transfer`` (streams, pinned memory) builds on these and re-exports them."""

from __future__ import annotations

import math

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: ``device`` if given, else ``cuda:0`` when available, else CPU."""
    if device is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was requested but CUDA is not available; use 'cpu'.")
    return device


def shares_host_memory(device: torch.device) -> bool:
    """True when the compute device *is* host memory, so host→device moves are free."""
    return device.type == "cpu"


# Direct (page-cache-bypassing) disk reads need buffers aligned to the block size; a page covers
# every block size Linux filesystems use.
PAGE = 4096
# Below this, alignment padding is not worth it: such reads go through a bounce buffer anyway.
_ALIGN_FROM = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor whose data starts on a ``PAGE`` boundary."""
    nbytes = nbytes_of(shape, dtype)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    # The view keeps ``raw``'s storage alive; the padding is at most one page.
    return at_phase(raw, nbytes, 0).view(dtype).view(shape)


def at_phase(raw: torch.Tensor, nbytes: int, phase: int) -> torch.Tensor:
    """``nbytes`` of the flat uint8 buffer ``raw`` (at least ``nbytes + PAGE`` long) starting
    ``phase`` bytes past a page boundary: a direct disk read from a file offset with the same
    phase fills all its whole blocks in place."""
    skip = (phase - raw.data_ptr()) % PAGE
    return raw[skip : skip + nbytes]


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
