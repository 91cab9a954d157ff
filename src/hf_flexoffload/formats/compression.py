"""Group-wise asymmetric quantization (FlexGen's compression) as pure functions over plain tensors.

A tensor is cut into groups of ``group_size`` consecutive elements along one dimension (by
default the last: a weight's input channels, the KV cache's head dimension); each group keeps a
minimum and a scale in the tensor's own dtype, and every element becomes an integer code
``round((x - min) / scale)`` in ``[0, 2**bits - 1]``. Two 4-bit codes share a byte. With 4 bits
and groups of 32 that is 5 bits per element, 31% of bf16 (groups of 64: 4.5 bits, 28%). How
each group's pair is chosen (min–max, or a search for the least squared error) is
``rounding``'s; the format is the same.

Internally a tensor of shape ``(..., n, ...)`` grouped along ``n`` is viewed as
``(pre, n, post)``: ``pre`` is the product of the dimensions before the grouped one, ``post`` of
those after it. Groups are formed as ``(pre, G, group_size, post)``, so dequantizing a weight
grouped along either of its dimensions writes a contiguous ``(out, in)`` matrix, with no
transpose. The byte format (``to_bytes``/``from_bytes``) is what the tiers store and move:
per record, scales, then minimums, then codes.

Example:
    >>> x = torch.randn(256, 128)
    >>> q = quantize(x, QuantConfig(bits=4, group_size=32, rounding="minmax"))
    >>> (dequantize(q) - x).abs().max() <= q.scale.max() / 2 + 1e-6
    tensor(True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config.policy import QuantConfig
from . import int4_tiled, rounding
from .int4_tiled import TiledInt4

__all__ = [
    "QuantConfig",
    "QuantFormat",
    "QuantizedTensor",
    "TiledInt4",
    "dequantize",
    "from_bytes",
    "pack_codes",
    "quantize",
    "to_bytes",
    "unpack_codes",
]


def resolve_dim(config: QuantConfig, ndim: int, default: int = -1) -> QuantConfig:
    """``config`` with ``dim`` made a concrete non-negative index for an ``ndim``-d tensor."""
    dim = default if config.dim is None else config.dim
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"QuantConfig.dim={config.dim!r} is out of range for a {ndim}-d tensor; "
            f"use a dimension in [{-ndim}, {ndim - 1}]."
        )
    return replace(config, dim=dim % ndim)


@dataclass(frozen=True)
class QuantFormat:
    """How a tensor of ``shape`` and ``dtype`` looks once quantized: sizes only, no data.

    Attributes:
        shape: The original shape.
        dtype: The original dtype, also the dtype of scales and minimums.
        config: The quantization, with ``dim`` resolved to a non-negative index.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    config: QuantConfig

    @classmethod
    def of(
        cls, shape: tuple[int, ...], dtype: torch.dtype, config: QuantConfig, default_dim: int = -1
    ) -> QuantFormat:
        shape = tuple(shape)
        return cls(shape, dtype, resolve_dim(config, len(shape), default_dim))

    @property
    def tiled(self) -> bool:
        """Whether the bytes are in the CPU int4 kernel's layout (``int4_tiled``)."""
        c = self.config
        return int4_tiled.tileable(self.shape, c.bits, c.dim, c.group_size)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(pre, groups, group_size, post) of the grouped view."""
        d = self.config.dim
        pre, post = math.prod(self.shape[:d]), math.prod(self.shape[d + 1 :])
        groups = -(-self.shape[d] // self.config.group_size)
        return pre, groups, self.config.group_size, post

    def record_bytes(self, lead_dims: int = 0) -> int:
        """Bytes of one record when the first ``lead_dims`` dimensions index records (all of it
        when 0), padded so that each record's scales stay aligned to their dtype."""
        if lead_dims > self.config.dim:
            raise ValueError(
                f"Records over the first {lead_dims} dims would cut groups along dim "
                f"{self.config.dim}."
            )
        if self.tiled:
            if lead_dims:
                raise ValueError("A weight in the int4 kernel's layout is one record.")
            return int4_tiled.record_bytes(self.shape, self.config.group_size)
        pre, groups, size, post = self.dims
        records = math.prod(self.shape[:lead_dims])
        pairs = pre * groups * post // records
        code_bytes = pairs * size * self.config.bits // 8
        nbytes = 2 * pairs * self.dtype.itemsize + code_bytes
        return -(-nbytes // self.dtype.itemsize) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.record_bytes(0)

    @property
    def plain_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor as plain tensors.

    Attributes:
        codes: (records, pre, groups, group_size * bits / 8, post) uint8, two 4-bit codes per byte.
        scale: (records, pre, groups, 1, post) in ``format.dtype``.
        minimum: (records, pre, groups, 1, post) in ``format.dtype``.
        format: Shape, dtype and config of the original tensor.
        lead_dims: The first ``lead_dims`` dims of ``format.shape`` index the records.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    format: QuantFormat
    lead_dims: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.format.shape


def pack_codes(codes: torch.Tensor, bits: int, dim: int = -2) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into uint8; for 4 bits the first half of ``dim`` goes
    to the low nibbles and the second half to the high ones (``dim`` must have even size)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    low, high = codes.chunk(2, dim=dim)
    return low | (high << 4)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int = -2) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 codes in [0, 2**bits)."""
    if bits == 8:
        return packed
    return torch.cat((packed & 0x0F, packed >> 4), dim=dim)


def quantize(
    x: torch.Tensor,
    config: QuantConfig,
    *,
    lead_dims: int = 0,
    default_dim: int = -1,
    tile: bool = True,
) -> QuantizedTensor | TiledInt4:
    """Quantize ``x`` group-wise along ``config.dim`` (``default_dim`` when it is None).

    Runs on ``x``'s device, reading nothing back on the host. A grouped dimension that is not a
    multiple of the group size is padded with a copy of its last element, which changes no
    group's min or max (and which the search gives no weight). A constant group gets scale 0
    and is reproduced exactly. Scales and minimums are stored in ``x.dtype``.

    Args:
        x: Any floating tensor.
        config: Bits, group size, dimension and rounding (None: ``"search"``).
        lead_dims: The first ``lead_dims`` dims index independent records (``to_bytes`` with the
            same value makes one record per index; the KV cache uses 1: one record per token).
        default_dim: The dimension used when ``config.dim`` is None.
        tile: False keeps the generic layout even where the kernel's applies (a block of rows
            of a matrix that is not in the kernel's layout as a whole).

    Returns:
        The QuantizedTensor, or a TiledInt4 for a weight the CPU int4 kernel can multiply
        (``QuantFormat.tiled``).
    """
    fmt = QuantFormat.of(tuple(x.shape), x.dtype, config, default_dim)
    fmt.record_bytes(lead_dims)  # records must not cut groups
    pre, groups, size, post = fmt.dims
    n = x.shape[fmt.config.dim]
    flat = x.reshape(pre, n, post)
    weight = None
    if groups * size != n:
        pad = flat[:, n - 1 : n].expand(pre, groups * size - n, post)
        flat = torch.cat((flat, pad), dim=1)
        weight = (torch.arange(groups * size, device=x.device) < n).float()
        weight = weight.reshape(1, groups, size, 1)
    grouped = flat.reshape(pre, groups, size, post).float()
    levels = 2**fmt.config.bits - 1
    choose = rounding.minmax if fmt.config.rounding == "minmax" else rounding.search
    scale, low = choose(grouped, levels, x.dtype, weight)
    if (
        fmt.tiled and tile and not lead_dims
    ):  # (N, G, 1, 1): each group's pair, packed for the kernel
        return int4_tiled.pack(x, low.float()[:, :, 0, 0], scale.float()[:, :, 0, 0], fmt)
    codes = rounding.codes(grouped, scale, low, levels)
    records = math.prod(x.shape[:lead_dims])
    view = (records, pre // records, groups, -1, post)
    return QuantizedTensor(
        codes=pack_codes(codes, fmt.config.bits).reshape(view),
        scale=scale.reshape(view),
        minimum=low.reshape(view),
        format=fmt,
        lead_dims=lead_dims,
    )


def dequantize(q: QuantizedTensor | TiledInt4, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``q`` stands for, in its original shape and dtype, computed on ``q``'s device.

    Args:
        q: A QuantizedTensor.
        out: Optional contiguous tensor of the original shape and dtype to write into.

    Returns:
        ``out`` or a new tensor.
    """
    if isinstance(q, TiledInt4):
        return int4_tiled.dequantize(q, out)
    fmt = q.format
    records, pre, groups, _, post = q.codes.shape
    size, n = fmt.config.group_size, fmt.shape[fmt.config.dim]
    codes = unpack_codes(q.codes, fmt.config.bits, dim=3).to(fmt.dtype)  # (r, pre, G, g, post)
    whole = out is not None and groups * size == n
    values = out.view(codes.shape) if whole else torch.empty_like(codes)
    minimum = q.minimum
    if post == 1 and fmt.dtype.itemsize < 4:
        # Grouped along the last dim, scale and minimum both repeat along the innermost one,
        # where torch's addcmul runs a scalar loop (3.5x slower in bf16 here); with the minimum
        # spread first only the scale repeats, and the loop is vectorized.
        minimum = values.copy_(minimum.expand(codes.shape))
    # Codes are small integers, exact in every float dtype, and addcmul rounds once, so this
    # equals computing in fp32 and casting, at a third of the memory traffic.
    torch.addcmul(minimum, codes, q.scale, out=values)
    if whole:
        return out
    values = values.view(records * pre, groups * size, post)
    if out is None:
        return values[:, :n].reshape(fmt.shape)
    out.view(records * pre, n, post).copy_(values[:, :n])
    return out


def to_bytes(q: QuantizedTensor | TiledInt4) -> torch.Tensor:
    """The storage form of ``q``: (records, record_bytes) uint8, or (nbytes,) for one record.

    Each record holds its scales, then its minimums, then its codes, zero-padded to the record
    size of ``QuantFormat.record_bytes``. A TiledInt4 is one record in its own layout.
    """
    if isinstance(q, TiledInt4):
        return int4_tiled.to_bytes(q)
    records = q.codes.shape[0]
    parts = [t.reshape(records, -1).view(torch.uint8) for t in (q.scale, q.minimum, q.codes)]
    lead = q.lead_dims
    width = q.format.record_bytes(lead)
    used = sum(p.shape[1] for p in parts)
    if used < width:
        parts.append(q.codes.new_zeros(records, width - used))
    data = torch.cat(parts, dim=1)
    return data.reshape(-1) if lead == 0 else data.reshape(*q.format.shape[:lead], width)


def from_bytes(data: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor | TiledInt4:
    """Views of the scales, minimums and codes in ``data`` (no copy when rows are contiguous).

    Args:
        data: uint8, (nbytes,) for a whole tensor or (*fmt.shape[:k], record_bytes) for
            records over the first ``k`` dims.
        fmt: The format the bytes were written with.
    """
    lead = data.ndim - 1
    width = fmt.record_bytes(lead)
    if data.shape[-1] != width or tuple(data.shape[:-1]) != fmt.shape[:lead]:
        raise ValueError(
            f"Quantized bytes of shape {list(data.shape)} do not match {fmt} (expected "
            f"{[*fmt.shape[:lead], width]})."
        )
    if fmt.tiled:
        return int4_tiled.from_bytes(data, fmt)
    records = math.prod(fmt.shape[:lead])
    rows = data.reshape(records, width)
    pre, groups, size, post = fmt.dims
    pre //= records
    pairs = pre * groups * post
    pair_bytes = pairs * fmt.dtype.itemsize
    code_bytes = pairs * size * fmt.config.bits // 8
    pair_view = (records, pre, groups, 1, post)

    def pairs_at(offset: int) -> torch.Tensor:
        return rows[:, offset : offset + pair_bytes].view(fmt.dtype).reshape(pair_view)

    codes = rows[:, 2 * pair_bytes : 2 * pair_bytes + code_bytes]
    return QuantizedTensor(
        codes=codes.reshape(records, pre, groups, -1, post),
        scale=pairs_at(0),
        minimum=pairs_at(pair_bytes),
        format=fmt,
        lead_dims=lead,
    )
