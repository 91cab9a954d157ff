"""Asynchronous moves between tiers: the only module that knows CUDA streams and pinned memory.

With ``overlap=True`` weight reads, other reads (disk→host→device) and writes
(device→host→disk) run in three background threads, so I/O proceeds while the main thread
computes (torch and file I/O release the GIL). On CUDA each thread issues its copies on its own
stream and hands back an event with the result: the compute stream waits for that event, the
main thread does not, so it can enqueue layer j + 1 while the GPU still runs layer j. A task that
moves nothing runs inline (a thread hand-off would cost more than the task). With
``overlap=False`` every task runs inline, in submission order: the same code path, just
synchronous. Everything degrades to plain CPU tensors when there is no CUDA.

Pinned memory: only what is copied asynchronously is page-locked. Small per-step buffers use
torch's caching host allocator (``host_empty(pin=True)``); large long-lived ones (the host weight
tier, staging) are registered at their exact size by ``PinnedHost``, since the caching allocator
rounds every block up to a power of two and keeps freed blocks.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .host_buffers import _ALIGN_FROM, PAGE, at_phase, nbytes_of

# Re-exported: where the rest of the package looks for them.
from .host_buffers import aligned_empty as aligned_empty
from .host_buffers import resolve_device as resolve_device
from .host_buffers import shares_host_memory as shares_host_memory

logger = logging.getLogger(__name__)


def host_empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    phase: int | None = None,
    pin: bool = False,
) -> torch.Tensor:
    """An uninitialized host tensor; pinned (caching host allocator) when ``pin`` and ``device``
    is CUDA, for small buffers copied asynchronously. Large long-lived ones: ``PinnedHost``.

    Large CPU buffers start on a page boundary so direct disk reads can fill them in place.
    ``phase``: start this many bytes past a page boundary instead (any size, pinned or not), to
    match the file offset a direct read will fill the buffer from.
    """
    pinned = pin and device.type == "cuda"
    if phase is not None:
        raw = torch.empty(nbytes_of(shape, dtype) + PAGE, dtype=torch.uint8, pin_memory=pinned)
        return at_phase(raw, nbytes_of(shape, dtype), phase).view(dtype).view(shape)
    if pinned:
        return torch.empty(shape, dtype=dtype, pin_memory=True)  # pinned pages are aligned
    return (
        aligned_empty(shape, dtype)
        if nbytes_of(shape, dtype) >= _ALIGN_FROM
        else torch.empty(shape, dtype=dtype)
    )


def pinned_host_empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    register: Callable[[int, int], None] | None = None,
    unregister: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """A host tensor page-locked at its size (whole pages, not the caching allocator's power of
    two) while any view of it lives, for large buffers copied asynchronously that no
    ``PinnedHost`` owns (the host-tier KV cache). Off CUDA (and without test hooks): unpinned."""
    nbytes = nbytes_of(shape, dtype)
    if nbytes == 0 or (device.type != "cuda" and register is None):
        return host_empty(shape, dtype, device)
    span = -(-nbytes // PAGE) * PAGE
    pages = mmap.mmap(-1, span)
    block = (ctypes.c_char * span).from_buffer(pages)
    address = ctypes.addressof(block)
    try:
        (register or _cuda_register)(address, span)
        # The tensor keeps ``block`` alive; the finalizer keeps ``pages`` mapped until it ran.
        weakref.finalize(block, lambda pages: (unregister or _cuda_unregister)(address), pages)
    except RuntimeError as err:  # page-locked memory is limited (ulimit -l): unpinned, slower
        logger.warning("%s Left unpinned: its copies to the device are synchronous.", err)
    return torch.frombuffer(block, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


class PinnedHost:
    """Page-locked host buffers of exactly the size asked for, owned by one holder.

    ``pin_memory=True`` goes through torch's caching host allocator, which rounds every block up
    to a power of two and keeps freed blocks: a 1.1 GiB host weight tier would pin 2 GiB while
    the budget counts 1.1. So large long-lived buffers are plain page-aligned allocations,
    registered with the CUDA driver whole page by page (``cudaHostRegister``) and unregistered by
    ``release``. Without a CUDA device, or with ``enabled=False`` (``Policy.pin_weights``), they
    are plain host memory.

    Args:
        device: The compute device.
        enabled: Pin at all.
        register, unregister: ``(address, nbytes)`` / ``(address)`` hooks; default the CUDA
            runtime's (tests pass fakes).
    """

    def __init__(
        self,
        device: torch.device,
        enabled: bool = True,
        register: Callable[[int, int], None] | None = None,
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.active = enabled and (device.type == "cuda" or register is not None)
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        self._held: dict[int, tuple[torch.Tensor, int, int]] = {}  # view address -> raw, span

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked now (whole pages)."""
        return sum(span for _, _, span in self._held.values())

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, phase: int = 0) -> torch.Tensor:
        """An uninitialized host tensor starting ``phase`` bytes past a page boundary."""
        nbytes = nbytes_of(shape, dtype)
        if not self.active or nbytes == 0:
            return host_empty(shape, dtype, self.device, phase)
        # Whole pages of our own, registered whole: a page shared with another allocation could
        # be registered twice, which the driver refuses. The tensor's storage is exactly the
        # registered range: ``is_pinned()`` asks the driver about the storage's first byte, so
        # a storage starting before the registration would look unpinned.
        span = -(-(phase + nbytes) // PAGE) * PAGE
        raw = torch.frombuffer(mmap.mmap(-1, span), dtype=torch.uint8)  # starts on a page
        self._register(raw.data_ptr(), span)
        view = raw[phase : phase + nbytes].view(dtype).view(shape)
        self._held[view.data_ptr()] = (raw, raw.data_ptr(), span)
        return view

    def release(self, tensor: torch.Tensor | None = None) -> None:
        """Unpin ``tensor`` (one ``empty`` returned), or everything; the memory is freed once
        no tensor uses it."""
        keys = [tensor.data_ptr()] if tensor is not None else list(self._held)
        for key in keys:
            held = self._held.pop(key, None)
            if held is not None:
                self._unregister(held[1])


class StagingRing:
    """Pinned host buffers that disk reads land in before their copy to the device, used in
    turn: a buffer is refilled only once the copy that last read it has run (an event per
    buffer), so reading the next tensor overlaps copying this one, and nothing is allocated per
    step. Used by one thread at a time.

    Args:
        pinned: Where the buffers come from (and are counted).
        slots: Buffers in the ring.
    """

    def __init__(self, pinned: PinnedHost, slots: int = 2) -> None:
        self.pinned = pinned
        self._slots: list[torch.Tensor | None] = [None] * slots
        self._events: list[Any] = [None] * slots
        self._turn = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._slots if t is not None)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, phase: int = 0) -> torch.Tensor:
        """The next buffer as ``shape``/``dtype`` at ``phase``; copy out of it, then call
        ``copied``."""
        i = self._turn
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        nbytes = nbytes_of(shape, dtype)
        buf = self._slots[i]
        if buf is None or buf.numel() < nbytes + PAGE:
            if buf is not None:
                self.pinned.release(buf)
            buf = self._slots[i] = self.pinned.empty((nbytes + PAGE,), torch.uint8)
        return at_phase(buf, nbytes, phase).view(dtype).view(shape)

    def copied(self) -> None:
        """The copy out of the buffer ``take`` returned is enqueued on the current stream."""
        if self.pinned.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.pinned.device))
            self._events[self._turn] = event
        self._turn = (self._turn + 1) % len(self._slots)

    def close(self) -> None:
        for i, buf in enumerate(self._slots):
            if self._events[i] is not None:
                self._events[i].synchronize()
            if buf is not None:
                self.pinned.release(buf)
        self._slots = [None] * len(self._slots)
        self._events = [None] * len(self._slots)


class ChunkCopies:
    """Host-to-device copies of a matrix's chunks into two device buffers in turn, on CUDA on a
    side stream, so copying chunk i + 1 overlaps the compute stream's use of chunk i (the
    streamed LM head); a buffer is refilled once that use is done. Without CUDA: inline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._used: list[Any] = [None, None]  # per buffer: the compute stream's last use

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Enqueue ``dst.copy_(src)`` into buffer ``slot`` (0 or 1); returns what ``ready``
        waits for."""
        if self._stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self._stream):
            if self._used[slot] is not None:
                self._stream.wait_event(self._used[slot])
            dst.record_stream(self._stream)
            dst.copy_(src, non_blocking=src.is_pinned())
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    def ready(self, done: Any) -> None:
        """Order the compute stream after the copy that returned ``done``."""
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def used(self, slot: int) -> None:
        """The compute stream's use of buffer ``slot`` is enqueued: its refill waits for it."""
        if self._stream is not None:
            self._used[slot] = torch.cuda.current_stream(self.device).record_event()


def _cuda_register(address: int, nbytes: int) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))
    if err != 0:
        raise RuntimeError(
            f"Pinning {nbytes} bytes of host memory failed (cudaError {err}). The system may "
            "limit page-locked memory (ulimit -l); pass pin_weights=False in the policy."
        )


def _cuda_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def to_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A pinned host copy of ``tensor``, enqueued on the current stream (the caller orders its
    use: a device consumer waits for the stream's event, a host consumer calls
    ``host_ready``); a CPU tensor is returned as is."""
    if tensor.device.type == "cpu":
        return tensor
    out = host_empty(tuple(tensor.shape), tensor.dtype, device, pin=True)
    out.copy_(tensor, non_blocking=True)
    return out


def host_ready(device: torch.device) -> None:
    """Wait until the copies enqueued so far on ``device``'s current stream have landed, before
    the host reads what ``to_host`` returned. One wait for several copies (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def to_compute(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on the compute device; no copy when it is already there."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.is_pinned())


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host result on the compute device without blocking the host: staged through pinned
    memory (the caching host allocator keeps that block until the copy has run)."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = host_empty(tuple(tensor.shape), tensor.dtype, device, pin=True).copy_(tensor)
    return tensor.to(device, non_blocking=True)


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
    """A result that is (or will be) ready; ``wait()`` returns it, ordered before whatever the
    caller's current stream runs next.

    Args:
        future: The background task; it returns the result, or ``(result, event)`` when it ran
            on a CUDA side stream (the event marks the end of its copies).
        value: An already-computed result (inline tasks).
        device: The compute device.
    """

    def __init__(self, future: Future | None = None, value: Any = None, device=None) -> None:
        self._future = future
        self._value = value
        self._device = device

    def wait(self) -> Any:
        if self._future is None:
            return self._value
        value = self._future.result()
        if self._device is None or self._device.type != "cuda":
            return value
        value, done = value
        # The caller's stream (not its thread) waits for the side stream's copies: the host goes
        # on enqueuing work. Tensors made on the side stream: tell the allocator this stream uses
        # them too.
        current = torch.cuda.current_stream(self._device)
        current.wait_event(done)
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

    def read_weights(self, fn: Callable[..., Any], *args: Any, idle: bool = False) -> Pending:
        """Fetch a stage's weights; a queue of its own, so a large weight read never delays the
        next micro-batch's (small) cache and hidden-state reads. ``idle``: the task moves no
        bytes, so it runs inline."""
        return self._submit("weights", fn, args, idle)

    def read(self, fn: Callable[..., Any], *args: Any, idle: bool = False) -> Pending:
        """Fetch a micro-batch's inputs (hidden states, KV history); ``idle`` as above."""
        return self._submit("read", fn, args, idle)

    def write(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Run a write-back of tensors the compute stream produced. A task whose result the
        host reads (bytes bound for a file or for host attention) waits for its own copies."""
        return self._submit("write", fn, args, False)

    def _submit(self, kind: str, fn: Callable[..., Any], args: tuple, idle: bool) -> Pending:
        if not self.overlap or idle:
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

        def on_stream() -> tuple[Any, Any]:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                result = fn(*args)
                done = torch.cuda.Event()
                done.record(stream)
            return result, done

        return Pending(self._pools[kind].submit(on_stream), device=self.device)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()
