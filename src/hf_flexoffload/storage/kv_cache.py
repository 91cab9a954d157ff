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

import math
import os

import torch

from ..architectures.layers import attention
from ..config.counters import Counters
from ..formats.compression import (
    QuantConfig,
    QuantFormat,
    dequantize,
    from_bytes,
    quantize,
    to_bytes,
)
from .disk_file import DiskFile
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


class TokenCodec:
    """How one token of a unit is stored: (2, b, H_kv, d) in the compute dtype, or its quantized
    bytes (one record per token). Quantization groups run along ``d`` only, so every group lies
    within one KV head (a head narrower than the group size is padded, never joined to the next).

    Args:
        token_shape: (2, b, H_kv, d).
        dtype: The compute dtype.
        config: ``Policy.compress_cache`` (None = store as is; rounding None = min-max).
    """

    def __init__(
        self, token_shape: tuple[int, ...], dtype: torch.dtype, config: QuantConfig | None
    ) -> None:
        self.token_shape = token_shape
        self.dtype = dtype
        # Every new token is quantized at run time: min-max unless the config asks for the
        # search (a dozen passes over the token where min-max makes three).
        self.config = None if config is None else config.resolved("minmax")
        if config is None:
            self.record_shape, self.storage_dtype = token_shape, dtype
        else:
            fmt = QuantFormat.of((1, *token_shape), dtype, config)
            self.record_shape, self.storage_dtype = (fmt.record_bytes(1),), torch.uint8

    @property
    def record_bytes(self) -> int:
        return math.prod(self.record_shape) * self.storage_dtype.itemsize

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(s, 2, b, H_kv, d) -> (s, *record_shape), on the tokens' device."""
        if self.config is None:
            return tokens
        return to_bytes(quantize(tokens, self.config, lead_dims=1))

    def decode(self, records: torch.Tensor) -> torch.Tensor:
        """(S, *record_shape) -> (S, 2, b, H_kv, d) in the compute dtype, on the records' device."""
        if self.config is None:
            return records
        fmt = QuantFormat.of((records.shape[0], *self.token_shape), self.dtype, self.config)
        return dequantize(from_bytes(records, fmt))


class HistoryBuffers:
    """Two host buffers that disk units read their history into, in turn: one is attended over
    while the next unit's history is prefetched into the other. Each has room for the new token,
    so attention needs no concatenated copy either. (Fresh buffers of tens of MB would be
    page-faulted in on every layer of every step, at a fraction of memory bandwidth.)
    """

    def __init__(self, device: torch.device, counters: Counters) -> None:
        self.device = device
        self.counters = counters
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._wide: list[torch.Tensor | None] = [None, None]  # host attention's fp32 keys, values
        self._turn = 0

    def take(self, tokens: int, record_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next buffer as (tokens, *record_shape); called by fetches, in order."""
        i, self._turn = self._turn, 1 - self._turn
        need = tokens * math.prod(record_shape) * dtype.itemsize
        buf = self._buffers[i]
        if buf is None or buf.numel() < need:
            if buf is not None:
                self.counters.free("host", buf.numel())
            buf = host_empty((need,), torch.uint8, self.device)
            self.counters.alloc("host", need)
            self._buffers[i] = buf
        return buf[:need].view(dtype).view(tokens, *record_shape)

    def widen(
        self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, H_kv, S, d) keys and values converted to ``dtype`` in two reused host buffers
        (valid until the next call)."""
        out = []
        for i, t in enumerate((keys, values)):
            need = t.numel() * dtype.itemsize
            buf = self._wide[i]
            if buf is None or buf.numel() < need:
                if buf is not None:
                    self.counters.free("host", buf.numel())
                buf = self._wide[i] = host_empty((need,), torch.uint8, self.device)
                self.counters.alloc("host", need)
            out.append(buf[:need].view(dtype).view(t.shape).copy_(t))
        return out[0], out[1]

    def close(self) -> None:
        for buf in (*self._buffers, *self._wide):
            if buf is not None:
                self.counters.free("host", buf.numel())
        self._buffers = [None, None]
        self._wide = [None, None]


class KVUnit:
    """Keys and values of one layer for one micro-batch, stored token-major: (S, 2, b, H_kv, d),
    or (S, record_bytes) when compressed."""

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
    ) -> None:
        self.tier = tier
        self.token_shape = (2, batch, heads, head_dim)
        self.codec = TokenCodec(self.token_shape, dtype, compress)
        self.dtype = dtype
        self.device = device
        self.host_attention = host_attention
        self.counters = counters
        self.length = 0
        self._capacity_hint = max(1, capacity)
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
        if needed > cap:
            new_cap = max(needed, 2 * cap, self._capacity_hint)
            shape, dtype = (new_cap, *self.codec.record_shape), self.codec.storage_dtype
            if self.tier == "device":
                grown = torch.empty(shape, dtype=dtype, device=self.device)
            else:
                grown = pinned_host_empty(shape, dtype, self.device)  # async uploads
            if self._buffer is not None:
                grown[:start].copy_(self._buffer[:start])
            self.counters.alloc(self._memory_tier, (new_cap - cap) * self.token_bytes)
            self._buffer = grown
        self._buffer[start:needed].copy_(new)

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
            history = self._buffer[: self.length]
        else:
            shape = (self.length, *self.codec.record_shape)
            if self._scratch is not None and on_host and self.codec.config is None:
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
    ) -> torch.Tensor:
        """Store the new keys/values and attend over the whole history.

        Args:
            history: What ``fetch`` returned for this step.
            q: (b, s, H, d) new queries on the device.
            k, v: (b, s, H_kv, d) new keys and values; ``H`` is a multiple of ``H_kv``.
            key_mask: (b, S) padding mask over all positions, or None.
            mover: Runs the write-back of the new keys/values.
            scale: Multiplies the attention scores (1.0 for queries scaled beforehand).

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
        if in_memory:
            self._append_memory(start, stored.to(where))
            history = self._buffer[:start]
        else:
            self._pending = mover.write(self._store, start, stored)
        room, self._room = self._room, None
        if in_memory and self.codec.config is None:
            full = self._buffer[: start + s]  # attend over the buffer itself: no copy
        elif history is None or start == 0:
            full = new.to(where)
        elif room is not None and room.shape[0] >= start + s:
            room[start : start + s].copy_(new)  # the history was read into room[:start]
            full = room[: start + s]
        else:
            full = torch.cat([self.codec.decode(history), new.to(where)])
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
            q.to(where, dtype).transpose(1, 2), keys.to(dtype), values.to(dtype), key_mask, scale
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
        else:
            # One copy to host memory, which the file write needs; it waits for its own copy.
            nbytes = self._file.write(start * self.token_bytes, new.to(CPU).contiguous())
            self.counters.add_moved("host_to_disk", nbytes)
            self.counters.alloc("disk", nbytes)

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
            self.counters.free("disk", self.length * self.token_bytes)
            if os.path.exists(self._path):
                os.remove(self._path)
            self._file = None
