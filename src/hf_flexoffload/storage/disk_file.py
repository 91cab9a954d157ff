"""One raw binary file of tensors: positional reads and writes, and ``O_DIRECT`` reads that
bypass the page cache (with a bounce buffer for what is not block-aligned)."""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor

import torch

from .transfer import PAGE, aligned_empty


def _byte_view(tensor: torch.Tensor) -> memoryview:
    # (n,) uint8 view of a contiguous CPU tensor, for os.pread/pwrite.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class DiskFile:
    """One raw binary file with positional reads and writes of whole tensors.

    Args:
        path: The file.
        create: Open it for writing, creating it if missing (otherwise it is only read, so
            read-only files, such as a checkpoint in a shared hub cache, can be read).
        direct: Read with ``O_DIRECT``, bypassing the page cache: the disk's DMA fills the
            buffer and no CPU time goes to copying out of cached pages (which matters when a
            read overlaps compute on few cores), and reads cost what cold reads cost, steadily.
            Needs filesystem support (``direct_io_supported``); writes stay buffered.
    """

    def __init__(self, path: str, create: bool = False, direct: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
        self._fd = os.open(path, flags, 0o644)
        self._direct_fd = _open_direct(path) if direct else -1

    @property
    def direct(self) -> bool:
        return self._direct_fd >= 0

    def write(self, offset: int, tensor: torch.Tensor) -> int:
        """Write a contiguous CPU tensor's bytes at ``offset``; returns bytes written."""
        view = _byte_view(tensor)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        return done

    def read_into(self, offset: int, out: torch.Tensor) -> int:
        """Fill the contiguous CPU tensor ``out`` from ``offset``; returns bytes read."""
        view = _byte_view(out)
        if self.direct:
            return self._read_direct(offset, view, out.data_ptr())
        return self._read_all(self._fd, offset, view)

    def read_ahead(
        self, offsets: list[int], outs: list[torch.Tensor], depth: int, pool: Executor
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """``read_into(offsets[i], outs[i])`` in order on ``pool``'s threads, ``depth`` at a
        time, yielding each filled ``outs[i]`` and its byte count; ``outs[i + depth]`` (which
        may share memory with ``outs[i]``) is read only after the caller resumes from ``i``."""
        pending = deque(
            pool.submit(self.read_into, offsets[i], outs[i]) for i in range(min(depth, len(outs)))
        )
        try:
            for i in range(len(outs)):
                nbytes = pending.popleft().result()
                yield outs[i], nbytes
                if i + depth < len(outs):
                    pending.append(pool.submit(self.read_into, offsets[i + depth], outs[i + depth]))
        finally:  # also when the caller stops early: no read may outlive the file or buffers
            for future in pending:
                future.exception()

    def _read_all(self, fd: int, offset: int, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{self.path} is shorter than expected (truncated offload file?)")
            done += n
        return done

    def _read_direct(self, offset: int, view: memoryview, address: int) -> int:
        # When the buffer and the file offset are equally far from a block boundary, the
        # block-aligned body goes straight into ``out``: only the unaligned head and tail go
        # through a small aligned bounce buffer. Otherwise (a buffer not placed for this file
        # offset) all of it is bounced.
        head = -offset % PAGE if offset % PAGE == address % PAGE else len(view)
        head = min(head, len(view))
        if head:
            self._read_bounced(offset, view[:head])
        body = (len(view) - head) // PAGE * PAGE
        if body:
            self._read_all(self._direct_fd, offset + head, view[head : head + body])
        if head + body < len(view):
            self._read_bounced(offset + head + body, view[head + body :])
        return len(view)

    def _read_bounced(self, offset: int, view: memoryview) -> None:
        start = offset // PAGE * PAGE  # the aligned block holding ``offset``
        chunk = min(_BOUNCE_BYTES, -(-(offset - start + len(view)) // PAGE) * PAGE)
        bounce = _byte_view(aligned_empty((chunk,), torch.uint8))
        done = 0
        while done < len(view):
            pos = offset + done
            block = pos // PAGE * PAGE
            skip = pos - block
            got = os.preadv(self._direct_fd, [bounce], block)  # short only at the end of file
            n = min(got - skip, len(view) - done)
            if n <= 0:
                raise OSError(f"{self.path} is shorter than expected (truncated offload file?)")
            view[done : done + n] = bounce[skip : skip + n]
            done += n

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1


_BOUNCE_BYTES = 4 << 20


def _open_direct(path: str) -> int:
    """A second, ``O_DIRECT`` descriptor for reads, or -1 where the OS or filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:  # EINVAL: the filesystem (e.g. tmpfs) does not support it
        return -1


def direct_io_supported(directory: str) -> bool:
    """Whether files under ``directory`` can be read with ``O_DIRECT``."""
    probe = os.path.join(directory, f".direct-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PAGE)
        fd = _open_direct(probe)
        if fd < 0:
            return False
        try:
            buf = aligned_empty((PAGE,), torch.uint8)
            return os.preadv(fd, [_byte_view(buf)], 0) == PAGE
        except OSError:
            return False
        finally:
            os.close(fd)
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def check_writable(directory: str, needed_bytes: int) -> None:
    """Fail early, before anything is written, if ``directory`` cannot take ``needed_bytes``."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write-probe")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(
            f"offload_dir={directory!r} is not writable ({err.strerror}). Pass an offload_dir on "
            "a disk you can write to."
        ) from err
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise OSError(
            f"offload_dir={directory!r} has {free / 2**30:.2f} GiB free but the disk tier needs "
            f"{needed_bytes / 2**30:.2f} GiB. Free space, choose another offload_dir, or lower the "
            "policy's disk fractions."
        )
