"""The three tiers as places to keep named tensors: device memory, host RAM and disk files.

Knows no model. Disk tensors are raw little-endian bytes in one file each, written atomically
(temporary name, then rename) and read back with positional reads into fresh or caller-given
buffers; no copy is kept in RAM. An ``index.json`` written last records what a directory holds
and for which source, so a later load can reuse the files, and a load interrupted before the
index was written is never trusted.

Every disk file is checked for changes before each run (``check_files``: its size, modification
time and inode), and a file adopted from an earlier load must still have the size and the sampled
content digest (``file_identity.sampled_digest``) the index recorded. A disk tensor can also be
*borrowed*: bytes at an offset of a file the store does not own (a checkpoint read in place),
never written or removed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..config.counters import Counters
from .disk_file import DiskFile, direct_io_supported
from .file_identity import sampled_digest, stat_identity
from .transfer import PinnedHost, host_empty

INDEX_FILE = "index.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r} in an offload index.")
    return dtype


@dataclass(frozen=True)
class Entry:
    """Where one stored tensor lives."""

    tier: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None  # device and host tiers
    path: str | None = None  # disk tier
    offset: int = 0  # where the bytes start in ``path``
    borrowed: bool = False  # ``path`` is someone else's file: read only

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class TierStore:
    """Named tensors on the device, in host RAM (pinned on CUDA) or in files under ``directory``.

    Args:
        device: The compute device (the "device" tier).
        directory: Where disk-tier files go.
        counters: Byte counters updated on every put, read and removal.
        direct_io: Read disk-tier tensors with ``O_DIRECT`` (see ``DiskFile``); may be changed
            between runs.
        pin: Page-lock host-tier tensors on CUDA (``Policy.pin_weights``), exactly their size.
    """

    def __init__(
        self,
        device: torch.device,
        directory: str,
        counters: Counters,
        direct_io: bool = False,
        pin: bool = True,
    ) -> None:
        self.device = device
        self.pinned = PinnedHost(device, enabled=pin)
        self.directory = directory
        self.counters = counters
        self.direct_io = direct_io
        self._direct_supported: bool | None = None
        self._entries: dict[str, Entry] = {}
        self._reusable: dict[str, dict[str, Any]] = {}
        self._borrowed: dict[str, tuple[int, ...]] = {}  # file -> identity when first borrowed
        self._written: dict[str, tuple[int, ...]] = {}  # own file -> identity when written
        self._readers: ThreadPoolExecutor | None = None  # for ``read_rows_ahead``

    def supports_direct_io(self) -> bool:
        """Whether ``directory``'s filesystem takes ``O_DIRECT`` reads (probed once)."""
        if self._direct_supported is None:
            self._direct_supported = direct_io_supported(self.directory)
        return self._direct_supported

    # -- reuse of a previous run's files -------------------------------------------------------

    def open_index(self, fingerprint: dict[str, Any]) -> None:
        """Adopt the directory's disk files if they were completely written for ``fingerprint``.

        Otherwise forget them: the index is removed first, so if this load is interrupted too,
        the next one will not trust half-written files.
        """
        path = os.path.join(self.directory, INDEX_FILE)
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError):
            index = None
        if index is not None and index.get("fingerprint") == fingerprint:
            self._reusable = {
                key: meta
                for key, meta in index.get("tensors", {}).items()
                if os.path.exists(self._path(key))
                and os.path.getsize(self._path(key)) == meta["nbytes"]
                and sampled_digest(self._path(key)) == meta.get("digest")
            }
        else:
            self._reusable = {}
            if os.path.exists(path):
                os.remove(path)

    def write_index(self, fingerprint: dict[str, Any]) -> None:
        """Record the complete set of disk files; called once every put has finished."""
        tensors = {
            key: {
                "shape": list(e.shape),
                "dtype": dtype_name(e.dtype),
                "nbytes": e.nbytes,
                "digest": sampled_digest(e.path),
            }
            for key, e in self._entries.items()
            if e.tier == "disk" and not e.borrowed
        }
        tmp = os.path.join(self.directory, INDEX_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint, "tensors": tensors}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, INDEX_FILE))

    def adopt(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Register an existing disk file for ``key`` if a previous run left a valid one."""
        meta = self._reusable.get(key)
        if meta is None or tuple(meta["shape"]) != shape or meta["dtype"] != dtype_name(dtype):
            return False
        entry = Entry("disk", shape, dtype, path=self._path(key))
        self._entries[key] = entry
        self._written[entry.path] = stat_identity(entry.path)
        self.counters.alloc("disk", entry.nbytes)
        return True

    # -- borrowed files ------------------------------------------------------------------------

    def reference(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, path: str, offset: int
    ) -> None:
        """Store ``key`` as the bytes at ``offset`` of ``path``, a file the store only reads."""
        self.remove(key)
        path = os.path.realpath(path)  # a hub cache's symlink may be re-pointed later
        if path not in self._borrowed:
            self._borrowed[path] = stat_identity(path)
        entry = Entry("disk", tuple(shape), dtype, path=path, offset=offset, borrowed=True)
        if offset + entry.nbytes > self._borrowed[path][0]:
            raise ValueError(f"{path} is shorter than the tensor {key} it should hold.")
        self._entries[key] = entry
        self.counters.alloc("disk", entry.nbytes)

    def borrowed_bytes(self) -> int:
        """Bytes of the disk tier read in place from files the store does not own."""
        return sum(e.nbytes for e in self._entries.values() if e.borrowed)

    def check_files(self) -> None:
        """Raise ``CheckpointChangedError`` if a disk file (borrowed, or written or adopted by
        this store) changed or was removed since the model was loaded."""
        for files, what in ((self._borrowed, "checkpoint"), (self._written, "offload")):
            for path, identity in files.items():
                try:
                    now = stat_identity(path)
                except OSError:
                    now = None
                if now != identity:
                    raise CheckpointChangedError(
                        f"The {what} file {path} changed (or was removed) after the model was "
                        "loaded; the disk tier reads weights from it, so they can no longer be "
                        "trusted. Load the model again with from_pretrained."
                    )

    # -- put / get -----------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".bin")

    def allocate(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, tier: str
    ) -> torch.Tensor:
        """A new, uninitialized memory-tier tensor stored under ``key``, for the caller to fill
        in place (so loading never holds a second copy)."""
        if tier not in ("device", "host"):
            raise ValueError(f"allocate() is for memory tiers, not {tier!r}.")
        self.remove(key)
        if tier == "device":
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            tensor = self.pinned.empty(shape, dtype)
        entry = Entry(tier, tuple(shape), dtype, tensor=tensor)
        self._entries[key] = entry
        self.counters.alloc(tier, entry.nbytes)
        return tensor

    def put(self, key: str, tensor: torch.Tensor, tier: str) -> None:
        """Store a copy of ``tensor`` under ``key`` on ``tier`` (replacing any previous one)."""
        self.remove(key)
        shape, dtype = tuple(tensor.shape), tensor.dtype
        if tier == "device":
            entry = Entry(tier, shape, dtype, tensor=tensor.to(self.device, copy=True).contiguous())
        elif tier == "host":
            host = self.pinned.empty(shape, dtype)
            host.copy_(tensor)
            entry = Entry(tier, shape, dtype, tensor=host)
        elif tier == "disk":
            path = self._path(key)
            tmp = path + ".tmp"
            f = DiskFile(tmp, create=True)
            try:
                f.write(0, tensor.detach().to("cpu").contiguous())
            finally:
                f.close()
            os.replace(tmp, path)
            self._written[path] = stat_identity(path)
            entry = Entry(tier, shape, dtype, path=path)
        else:
            raise ValueError(f"Unknown tier {tier!r}; allowed: device, host, disk.")
        self._entries[key] = entry
        self.counters.alloc(tier, entry.nbytes)

    def put_chunks(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        tier: str,
        chunks: Iterable[tuple[int, torch.Tensor]],
    ) -> None:
        """Store a tensor given as (first row, rows) chunks, each written straight to its place
        (converted to ``dtype`` on the way into memory tiers), so no whole copy is ever held.

        A disk tensor is written under a temporary name and renamed once complete."""
        if tier != "disk":
            dest = self.allocate(key, shape, dtype, tier)
            for row, rows in chunks:
                dest[row : row + rows.shape[0]].copy_(rows)
            return
        self.remove(key)
        entry = Entry(tier, tuple(shape), dtype, path=self._path(key))
        row_bytes = entry.nbytes // max(1, shape[0]) if shape else entry.nbytes
        tmp = entry.path + ".tmp"
        f = DiskFile(tmp, create=True)
        try:
            os.ftruncate(f.fileno(), 0)
            for row, rows in chunks:
                if rows.dtype != dtype:
                    raise ValueError(f"chunk of {key} is {rows.dtype}, expected {dtype}")
                f.write(row * row_bytes, rows.detach().to("cpu").contiguous())
        finally:
            f.close()
        os.replace(tmp, entry.path)
        self._written[entry.path] = stat_identity(entry.path)
        self._entries[key] = entry
        self.counters.alloc(tier, entry.nbytes)

    def entry(self, key: str) -> Entry:
        return self._entries[key]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read a disk-tier tensor into the contiguous host tensor ``out``."""
        entry = self._entries[key]
        f = DiskFile(entry.path, direct=self.direct_io)
        try:
            self.counters.add_moved("disk_to_host", f.read_into(entry.offset, out))
        finally:
            f.close()
        return out

    def read_rows(
        self, key: str, runs: list[tuple[int, int]], out: torch.Tensor, direct: bool = False
    ) -> torch.Tensor:
        """Rows ``[a, b)`` of the stored tensor for each run, one after another, into the
        contiguous host tensor ``out`` (as many rows as the runs hold); disk tensors are read
        with one positional read per run, with ``O_DIRECT`` when ``direct`` and the store reads
        directly (worth it for large runs only)."""
        entry = self._entries[key]
        done = 0
        if entry.tensor is not None:
            for a, b in runs:
                out[done : done + b - a].copy_(entry.tensor[a:b])
                done += b - a
            return out
        row_bytes = entry.nbytes // max(1, entry.shape[0])
        f = DiskFile(entry.path, direct=direct and self.direct_io)
        try:
            for a, b in runs:
                n = f.read_into(entry.offset + a * row_bytes, out[done : done + b - a])
                self.counters.add_moved("disk_to_host", n)
                done += b - a
        finally:
            f.close()
        return out

    def read_rows_ahead(
        self, key: str, runs: list[tuple[int, int]], views: list[torch.Tensor], depth: int
    ) -> Iterator[torch.Tensor]:
        """``read_rows(key, [runs[i]], views[i])`` for each run in order, yielding each filled
        view while up to ``depth`` direct reads are in flight (one synchronous read at a time
        left the disk idle during each conversion); see ``DiskFile.read_ahead``."""
        entry = self._entries[key]
        if entry.tensor is not None or depth <= 1:
            for run, view in zip(runs, views, strict=True):
                yield self.read_rows(key, [run], view, direct=True)
            return
        row_bytes = entry.nbytes // max(1, entry.shape[0])
        if self._readers is None:
            self._readers = ThreadPoolExecutor(depth, thread_name_prefix="hf-flexoffload-read")
        f = DiskFile(entry.path, direct=self.direct_io)
        offsets = [entry.offset + a * row_bytes for a, _ in runs]
        try:
            for view, nbytes in f.read_ahead(offsets, views, depth, self._readers):
                self.counters.add_moved("disk_to_host", nbytes)
                yield view
        finally:
            f.close()

    def get(self, key: str) -> torch.Tensor:
        """The tensor where it lives: device/host tensors as stored, disk ones read into a new
        host buffer (pinned on CUDA)."""
        entry = self._entries[key]
        if entry.tensor is not None:
            return entry.tensor
        return self.read_into(key, host_empty(entry.shape, entry.dtype, self.device))

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.counters.free(entry.tier, entry.nbytes)
        if entry.tier == "host":
            self.pinned.release(entry.tensor)
        if entry.path is not None and not entry.borrowed and os.path.exists(entry.path):
            self._written.pop(entry.path, None)
            os.remove(entry.path)

    def bytes_per_tier(self) -> dict[str, int]:
        out = {"device": 0, "host": 0, "disk": 0}
        for e in self._entries.values():
            out[e.tier] += e.nbytes
        return out

    def release(self) -> None:
        """Forget every entry; memory-tier tensors are freed, disk files stay for reuse."""
        for entry in self._entries.values():
            self.counters.free(entry.tier, entry.nbytes)
        self.pinned.release()
        self._entries.clear()
        self._borrowed.clear()
        self._written.clear()
        if self._readers is not None:
            self._readers.shutdown()
            self._readers = None

    def prune(self) -> None:
        """Remove tensor files in ``directory`` that no entry uses (left by an earlier load
        that placed or stored the weights differently), so they take no disk space."""
        used = {e.path for e in self._entries.values() if e.path is not None}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".bin") and path not in used:
                os.remove(path)


class CheckpointChangedError(RuntimeError):
    """A checkpoint file the disk tier reads in place changed after the model was loaded."""
