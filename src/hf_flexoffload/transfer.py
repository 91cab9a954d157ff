"""Asynchronous moves between tiers: the only module that knows CUDA streams and pinned memory.

With ``overlap=True`` weight reads, other reads (disk→host→device) and writes
(device→host→disk) run in three background threads, so I/O proceeds while the main thread
computes (torch and file I/O release the GIL). On CUDA each thread issues its copies on its own
stream and waits for them before handing tensors over. With ``overlap=False`` every task runs
inline, in submission order: the same code path, just synchronous. Everything degrades to plain
CPU tensors when there is no CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

logger = logging.getLogger(__name__)


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


def host_empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, phase: int | None = None
) -> torch.Tensor:
    """An uninitialized host tensor, pinned when ``device`` is CUDA (for async copies).

    Large CPU buffers start on a page boundary so direct disk reads can fill them in place.
    ``phase``: start this many bytes past a page boundary instead (any size, pinned or not), to
    match the file offset a direct read will fill the buffer from.
    """
    if phase is not None:
        raw = torch.empty(
            _nbytes(shape, dtype) + PAGE, dtype=torch.uint8, pin_memory=device.type == "cuda"
        )
        return at_phase(raw, _nbytes(shape, dtype), phase).view(dtype).view(shape)
    if device.type == "cuda":
        return torch.empty(shape, dtype=dtype, pin_memory=True)  # pinned pages are aligned
    return (
        aligned_empty(shape, dtype)
        if _nbytes(shape, dtype) >= _ALIGN_FROM
        else torch.empty(shape, dtype=dtype)
    )


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor whose data starts on a ``PAGE`` boundary."""
    nbytes = _nbytes(shape, dtype)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    # The view keeps ``raw``'s storage alive; the padding is at most one page.
    return at_phase(raw, nbytes, 0).view(dtype).view(shape)


def at_phase(raw: torch.Tensor, nbytes: int, phase: int) -> torch.Tensor:
    """``nbytes`` of the flat uint8 buffer ``raw`` (at least ``nbytes + PAGE`` long) starting
    ``phase`` bytes past a page boundary: a direct disk read from a file offset with the same
    phase fills all its whole blocks in place."""
    skip = (phase - raw.data_ptr()) % PAGE
    return raw[skip : skip + nbytes]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def to_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy of ``tensor`` (pinned on CUDA machines); a CPU tensor is returned as is."""
    if tensor.device.type == "cpu":
        return tensor
    out = host_empty(tuple(tensor.shape), tensor.dtype, device)
    out.copy_(tensor, non_blocking=True)
    return out


def to_compute(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on the compute device; no copy when it is already there."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.is_pinned())


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class Pending:
    """A result that is (or will be) ready; ``wait()`` returns it on the compute stream."""

    def __init__(self, future: Future | None = None, value: Any = None, device=None) -> None:
        self._future = future
        self._value = value
        self._device = device

    def wait(self) -> Any:
        value = self._future.result() if self._future is not None else self._value
        if self._device is not None and self._device.type == "cuda":
            # Tensors made on a side stream: tell the allocator the compute stream uses them too.
            current = torch.cuda.current_stream(self._device)
            for t in _tensors(value):
                if t.device.type == "cuda":
                    t.record_stream(current)
        return value


class Mover:
    """Runs read and write tasks, in the background when overlapping.

    Args:
        device: The compute device.
        overlap: Run tasks in background threads (and CUDA side streams) instead of inline.
    """

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device = device
        self.overlap = overlap
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._streams: dict[str, Any] = {}
        if overlap:
            for kind in ("weights", "read", "write"):
                self._pools[kind] = ThreadPoolExecutor(1, thread_name_prefix=f"flexoffload-{kind}")
                if device.type == "cuda":
                    self._streams[kind] = torch.cuda.Stream(device)

    def read_weights(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Fetch a stage's weights; a queue of its own, so a large weight read never delays the
        next micro-batch's (small) cache and hidden-state reads."""
        return self._submit("weights", fn, args)

    def read(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Fetch a micro-batch's inputs (hidden states, KV history)."""
        return self._submit("read", fn, args)

    def write(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Run a write-back of tensors the compute stream produced."""
        return self._submit("write", fn, args)

    def _submit(self, kind: str, fn: Callable[..., Any], args: tuple) -> Pending:
        if not self.overlap:
            return Pending(value=fn(*args))
        stream = self._streams.get(kind)
        if stream is None:
            return Pending(self._pools[kind].submit(fn, *args))
        # Order the side stream after the compute that produced the inputs, and keep the inputs'
        # memory from being reused by the compute stream until the side stream is done with it.
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        for t in _tensors(args):
            if t.device.type == "cuda":
                t.record_stream(stream)

        def on_stream() -> Any:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                result = fn(*args)
            stream.synchronize()
            return result

        return Pending(self._pools[kind].submit(on_stream), device=self.device)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()
