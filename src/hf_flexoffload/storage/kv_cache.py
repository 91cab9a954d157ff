"""The tiered KV cache: one unit per (layer, micro-batch), each on the tier the policy gives it.

Every unit stores keys and values token-major, ``(S, 2, b, H_kv, d)``, in every tier, so appending a
decode step is one contiguous write (a single ``pwrite`` on disk) and reading the history is one
contiguous read. Where attention runs:

* a unit in compute-device memory (or in host RAM on a CPU machine) appends in place and attends
  over views: no copy;
* a host or disk unit with ``host_attention`` attends on the CPU during decode: only the query,
  the new key/value and the attention output cross the host/device link;
* otherwise the history is prefetched to the device and the new token written back.

With ``compress_cache`` each token's keys and values are quantized on the compute device as they
are produced (groups along the head dimension within each KV head, so no group mixes two heads;
one record of bytes per token, so history is never requantized); the records are what every tier
stores and every link moves, and they are dequantized on the side that computes attention. The
new tokens themselves attend at full precision.

``offload_cache.FlexOffloadCache`` is the ``transformers.Cache`` that carries these units through
``generate``.
"""

from __future__ import annotations

import os

import torch

from ..architectures.layers import attention
from ..config.counters import Counters
from ..formats.compression import QuantConfig
from .disk_file import DiskFile
from .kv_codec import HistoryBuffers, TokenCodec
from .transfer import (
    Mover,
    Pending,
    host_empty,
    host_ready,
    pinned_host_empty,
    shares_host_memory,
    to_compute,
    to_host,
    upload,
)

CPU = torch.device("cpu")


class KVUnit:
    """Keys and values of one layer for one micro-batch, stored token-major: (S, 2, b, H_kv, d),
    or (S, record_bytes) when compressed.

    A sliding-window layer's unit (``window``) is a ring of ``window`` positions in whatever
    tier it lives: position ``t`` is stored at row ``t % window``, so it never holds, reads or
    writes more than its window, however long the sequence grows. Attention then knows each
    row's position (``key_slots``) and masks by position, so the result is the same as over the
    whole history in order.
    """

    def __init__(
        self,
        *,
        tier: str,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        host_attention: bool,
        path: str,
        counters: Counters,
        capacity: int,
        compress: QuantConfig | None = None,
        scratch: HistoryBuffers | None = None,
        window: int | None = None,
    ) -> None:
        self.tier = tier
        self.window = window
        self.token_shape = (2, batch, heads, head_dim)
        self.codec = TokenCodec(self.token_shape, dtype, compress)
        self.dtype = dtype
        self.device = device
        self.host_attention = host_attention
        self.counters = counters
        self.length = 0  # positions seen (a windowed unit stores only the last ``window``)
        self._capacity_hint = max(1, capacity if window is None else min(capacity, window))
        self._buffer: torch.Tensor | None = None  # (cap, *record_shape), device or host tier
        self._file = DiskFile(path, create=True) if tier == "disk" else None
        self._path = path
        self._pending: Pending | None = None
        self._scratch = scratch
        self._room: torch.Tensor | None = None  # the fetched history's buffer, one token longer

    @property
    def token_bytes(self) -> int:
        """Stored bytes per token (compressed when the cache is)."""
        return self.codec.record_bytes

    @property
    def stored(self) -> int:
        """Positions held: all of them, or a windowed layer's last ``window``."""
        return self.length if self.window is None else min(self.length, self.window)

    def _ring_slots(self, length: int, device: torch.device) -> torch.Tensor | None:
        """(window,) the position each ring row holds after ``length`` positions; None while
        rows and positions are still ``0..stored-1`` in order."""
        w = self.window
        if w is None or length <= w:
            return None
        rows = torch.arange(w, device=device)
        return rows + w * torch.div(length - 1 - rows, w, rounding_mode="floor")

    def _pieces(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """(row, first, n): where positions ``start .. start + count - 1`` are stored, in runs
        of consecutive rows (a windowed unit keeps only the last ``window`` of them)."""
        if self.window is None:
            return [(start, 0, count)]
        w, first = self.window, max(0, count - self.window)
        pieces = []
        while first < count:
            row = (start + first) % w
            n = min(count - first, w - row)
            pieces.append((row, first, n))
            first += n
        return pieces

    @property
    def in_compute_memory(self) -> bool:
        return self.tier == "device" or (self.tier == "host" and shares_host_memory(self.device))

    def _attends_on_host(self) -> bool:
        if shares_host_memory(self.device):
            return True
        # Prefill has no history whose move could be saved: it runs on the device.
        return not self.in_compute_memory and self.host_attention and self.length > 0

    def _append_memory(self, start: int, new: torch.Tensor) -> None:
        cap = 0 if self._buffer is None else self._buffer.shape[0]
        needed = start + new.shape[0]
        held = start
        if self.window is not None:
            needed, held = min(needed, self.window), min(start, self.window)
        if needed > cap:
            new_cap = max(needed, 2 * cap, self._capacity_hint)
            if self.window is not None:
                new_cap = min(new_cap, self.window)
            shape, dtype = (new_cap, *self.codec.record_shape), self.codec.storage_dtype
            if self.tier == "device":
                grown = torch.empty(shape, dtype=dtype, device=self.device)
            else:
                grown = pinned_host_empty(shape, dtype, self.device)  # async uploads
            if self._buffer is not None:
                grown[:held].copy_(self._buffer[:held])
            self.counters.alloc(self._memory_tier, (new_cap - cap) * self.token_bytes)
            self._buffer = grown
        for row, first, n in self._pieces(start, new.shape[0]):
            self._buffer[row : row + n].copy_(new[first : first + n])

    @property
    def _memory_tier(self) -> str:
        return "device" if self.tier == "device" else "host"

    # -- fetch (read thread), attend (compute), store (write thread) ---------------------------

    def wait_pending(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def fetch(self) -> torch.Tensor | None:
        """The stored history (S, *record_shape) where attention will run; None when used in
        place."""
        self.wait_pending()
        on_host = self._attends_on_host()
        if self.length == 0 or self.in_compute_memory or (self.tier == "host" and on_host):
            return None
        if self.tier == "host":
            history = self._buffer[: self.stored]
            if self.window is not None:
                # The ring's rows are overwritten by the write-back while the copy to the
                # device may still read them: copy them out first.
                history = history.clone()
        else:
            shape = (self.stored, *self.codec.record_shape)
            room = self.window is None and self.codec.config is None
            if self._scratch is not None and on_host and room:
                # Read into a reused buffer with a row to spare for the new token.
                room = self._scratch.take(
                    self.length + 1, self.codec.record_shape, self.codec.storage_dtype
                )
                self._room, history = room, room[: self.length]
            else:
                history = host_empty(shape, self.codec.storage_dtype, self.device)
            self.counters.add_moved("disk_to_host", self._file.read_into(0, history))
        if on_host:
            return history
        self.counters.add_moved("host_to_device", history.numel() * history.element_size())
        return to_compute(history, self.device)

    def attend(
        self,
        history: torch.Tensor | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        mover: Mover,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Store the new keys/values and attend over the whole history (a windowed unit's
        last ``window`` positions).

        Args:
            history: What ``fetch`` returned for this step.
            q: (b, s, H, d) new queries on the device.
            k, v: (b, s, H_kv, d) new keys and values; ``H`` is a multiple of ``H_kv``.
            key_mask: (b, S) padding mask over all positions, or None.
            mover: Runs the write-back of the new keys/values.
            scale: Multiplies the attention scores (1.0 for queries scaled beforehand).
            softcap: Attention-logit soft-capping (``layers.attention``), or None.

        Returns:
            (b, s, H, d) attention output on the compute device.
        """
        start, s = self.length, k.shape[1]
        on_host = self._attends_on_host()
        where = CPU if on_host else self.device
        new = torch.stack((k, v)).permute(2, 0, 1, 3, 4)  # (s, 2, b, H_kv, d)
        stored = self.codec.encode(new)  # (s, *record_shape), on the device
        if on_host and not shares_host_memory(self.device):
            # The query and the new tokens cross once each, with one wait for all the copies;
            # the write-back then stores the host copy instead of copying the tokens again.
            q, stored = to_host(q, self.device), to_host(stored, self.device)
            new = stored if self.codec.config is None else to_host(new, self.device)
            if key_mask is not None:
                key_mask = to_host(key_mask, self.device)
            host_ready(self.device)
            self.counters.add_moved(
                "device_to_host", q.numel() * q.element_size() + stored.numel() * stored.itemsize
            )
        in_memory = self.in_compute_memory or (self.tier == "host" and on_host)
        # A ring's new row may take the place of one the new queries still see (s > 1) or of
        # a compressed row the history is decoded from: then the keys are gathered first and
        # the new positions stored after. Otherwise they are stored first and attention reads
        # the buffer itself.
        store_first = self.window is None or (s == 1 and self.codec.config is None)
        if in_memory and store_first:
            history = self._buffer[:start] if self._buffer is not None else None
            self._append_memory(start, stored.to(where))
        elif in_memory:
            history = self._buffer[: self.stored] if self._buffer is not None else None
        elif store_first:
            self._pending = mover.write(self._store, start, stored)
        room, self._room = self._room, None
        slots = None
        if in_memory and store_first and self.codec.config is None:
            end = start + s if self.window is None else min(start + s, self.window)
            full = self._buffer[:end]  # attend over the buffer itself: no copy
            slots = self._ring_slots(start + s, where)
        elif history is None or start == 0:
            full = new.to(where)
        elif room is not None and room.shape[0] >= start + s:
            room[start : start + s].copy_(new)  # the history was read into room[:start]
            full = room[: start + s]
        else:
            full = torch.cat([self.codec.decode(history), new.to(where)])
            ring = self._ring_slots(start, where)
            if ring is not None:
                slots = torch.cat([ring, torch.arange(start, start + s, device=where)])
        if not store_first:
            if in_memory:
                self._append_memory(start, stored.to(where))
            else:
                self._pending = mover.write(self._store, start, stored)
        self.length = start + s
        keys = full[:, 0].permute(1, 2, 0, 3)  # (b, H_kv, S, d)
        values = full[:, 1].permute(1, 2, 0, 3)
        dtype = q.dtype
        if where.type == "cpu" and q.dtype == torch.float16:
            # Host attention runs fp16 in fp32 (CPU fp16 matmuls are slow or missing), in reused
            # buffers rather than a fresh fp32 copy of the history per layer and micro-batch.
            dtype = torch.float32
            if self._scratch is not None:
                keys, values = self._scratch.widen(keys, values, dtype)
        out = attention(
            q.to(where, dtype).transpose(1, 2),
            keys.to(dtype),
            values.to(dtype),
            key_mask,
            scale,
            window=self.window,
            softcap=softcap,
            key_slots=slots,
            length=start + s,
        )
        if on_host and not shares_host_memory(self.device):
            self.counters.add_moved("host_to_device", out.numel() * q.element_size())
            return upload(out.to(q.dtype), self.device)  # the host goes on without waiting
        return out.to(q.dtype)

    def _store(self, start: int, new: torch.Tensor) -> None:
        if new.device.type != "cpu":
            self.counters.add_moved("device_to_host", new.numel() * new.element_size())
        if self.tier == "host":
            self._append_memory(start, new)  # straight into the host buffer: one copy
            return
        # One copy to host memory, which the file write needs; it waits for its own copy.
        host = new.to(CPU).contiguous()
        for row, first, n in self._pieces(start, new.shape[0]):
            nbytes = self._file.write(row * self.token_bytes, host[first : first + n])
            self.counters.add_moved("host_to_disk", nbytes)
        end = start + new.shape[0]
        if self.window is not None:  # a ring's file grows to its window, no further
            start, end = min(start, self.window), min(end, self.window)
        self.counters.alloc("disk", (end - start) * self.token_bytes)

    def fetch_idle(self) -> bool:
        """Whether ``fetch`` would move nothing and wait for nothing, so it can run inline."""
        return self._pending is None and (
            self.length == 0
            or self.in_compute_memory
            or (self.tier == "host" and self._attends_on_host())
        )

    def close(self) -> None:
        self.wait_pending()
        if self._buffer is not None:
            self.counters.free(self._memory_tier, self._buffer.shape[0] * self.token_bytes)
            self._buffer = None
        if self._file is not None:
            self._file.close()
            self.counters.free("disk", self.stored * self.token_bytes)
            if os.path.exists(self._path):
                os.remove(self._path)
            self._file = None
