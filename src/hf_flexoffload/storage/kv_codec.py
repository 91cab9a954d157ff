"""How the KV cache stores one token (``TokenCodec``) and the reused host buffers disk units
read their history into (``HistoryBuffers``), for ``kv_cache.KVUnit``."""

from __future__ import annotations

import math

import torch

from ..config.counters import Counters
from ..formats.compression import (
    QuantConfig,
    QuantFormat,
    dequantize,
    from_bytes,
    quantize,
    to_bytes,
)
from .transfer import host_empty


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
