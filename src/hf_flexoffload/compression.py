"""Group-wise min–max quantization (FlexGen's compression) as pure functions over plain tensors.

A tensor is cut into groups of ``group_size`` consecutive elements along one dimension; each group
keeps its minimum and a scale ``(max - min) / (2**bits - 1)`` in the tensor's own dtype, and every
element becomes an integer code ``round((x - min) / scale)``. Two 4-bit codes share a byte. With
4 bits and groups of 64 that is 4.5 bits per element, 28% of bf16.

Internally a tensor of shape ``(..., n, ...)`` grouped along ``n`` is viewed as
``(pre, n, post)``: ``pre`` is the product of the dimensions before the grouped one, ``post`` of
those after it. Groups are formed as ``(pre, G, group_size, post)``, so dequantizing a weight
grouped along its output channels (dim 0) writes a contiguous ``(out, in)`` matrix, with no
transpose. The byte format (``to_bytes``/``from_bytes``) is what the tiers store and move:
per record, scales, then minimums, then codes.

Example:
    >>> x = torch.randn(256, 128)
    >>> q = quantize(x, QuantConfig(bits=4, group_size=64, dim=0))
    >>> (dequantize(q) - x).abs().max() <= q.scale.max() / 2 + 1e-6
    tensor(True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import int4_tiled
from .int4_tiled import TiledInt4
from .policy import QuantConfig

__all__ = [
    "QuantConfig",
    "QuantFormat",
    "QuantizedTensor",
    "TiledInt4",
    "dequantize",
    "from_bytes",
    "linear",
    "pack_codes",
    "quantize",
    "quantize_rows_to_bytes",
    "take_rows",
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
    x: torch.Tensor, config: QuantConfig, *, lead_dims: int = 0, default_dim: int = -1
) -> QuantizedTensor | TiledInt4:
    """Quantize ``x`` group-wise along ``config.dim`` (``default_dim`` when it is None).

    Runs on ``x``'s device. A grouped dimension that is not a multiple of the group size is
    padded with a copy of its last element, which changes no group's min or max. A constant
    group gets scale 0 and is reproduced exactly.

    Args:
        x: Any floating tensor.
        config: Bits, group size and dimension.
        lead_dims: The first ``lead_dims`` dims index independent records (``to_bytes`` with the
            same value makes one record per index; the KV cache uses 1: one record per token).
        default_dim: The dimension used when ``config.dim`` is None.

    Returns:
        The QuantizedTensor, or a TiledInt4 for a weight the CPU int4 kernel can multiply
        (``QuantFormat.tiled``).
    """
    fmt = QuantFormat.of(tuple(x.shape), x.dtype, config, default_dim)
    fmt.record_bytes(lead_dims)  # records must not cut groups
    pre, groups, size, post = fmt.dims
    n = x.shape[fmt.config.dim]
    flat = x.reshape(pre, n, post)
    if groups * size != n:
        pad = flat[:, n - 1 : n].expand(pre, groups * size - n, post)
        flat = torch.cat((flat, pad), dim=1)
    grouped = flat.reshape(pre, groups, size, post).float()
    low = grouped.amin(dim=2, keepdim=True)  # (pre, G, 1, post), exact in x.dtype
    high = grouped.amax(dim=2, keepdim=True)
    levels = 2**fmt.config.bits - 1
    if fmt.tiled and not lead_dims:  # (N, G, g, 1): ranges per group, packed for the kernel
        return int4_tiled.pack(x, low[:, :, 0, 0], ((high - low) / levels)[:, :, 0, 0], fmt)
    scale = _round_up((high - low) / levels, x.dtype)  # stored scale, never below the exact one
    inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
    codes = ((grouped - low) * inverse).round_().clamp_(0, levels)
    records = math.prod(x.shape[:lead_dims])
    view = (records, pre // records, groups, -1, post)
    return QuantizedTensor(
        codes=pack_codes(codes, fmt.config.bits).reshape(view),
        scale=scale.reshape(view),
        minimum=low.to(x.dtype).reshape(view),
        format=fmt,
        lead_dims=lead_dims,
    )


def _round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (fp32) in ``dtype``, rounded towards +inf so no group's range is clipped."""
    out = values.to(dtype)
    # Branch-free: testing ``low.any()`` first would wait for the device on every call.
    up = torch.nextafter(out, torch.full_like(out, math.inf))
    return torch.where(out.float() < values, up, out)


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
    # Codes are small integers, exact in every float dtype, and addcmul rounds once, so this
    # equals computing in fp32 and casting, at a third of the memory traffic.
    if out is not None and groups * size == n:
        torch.addcmul(q.minimum, codes, q.scale, out=out.view(codes.shape))
        return out
    values = torch.addcmul(q.minimum, codes, q.scale).view(records * pre, groups * size, post)
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


def take_rows(q: QuantizedTensor | TiledInt4, index: torch.Tensor) -> torch.Tensor:
    """``dequantize(q)[index]`` for a 2-D ``q``, dequantizing exactly those rows (an embedding
    lookup reads a few rows of a large matrix): memory is the rows asked for, not their groups.

    Args:
        q: A quantized (rows, cols) matrix.
        index: Row indices of any shape.

    Returns:
        (*index.shape, cols) in the original dtype.
    """
    if isinstance(q, TiledInt4):
        return int4_tiled.take_rows(q, index)
    fmt = q.format
    if len(fmt.shape) != 2:
        raise ValueError(f"take_rows needs a quantized matrix, got shape {list(fmt.shape)}.")
    flat = index.reshape(-1)
    if fmt.config.dim == 1:  # groups run along each row: rows are independent
        rows = QuantizedTensor(
            codes=q.codes[:, flat],
            scale=q.scale[:, flat],
            minimum=q.minimum[:, flat],
            format=replace(fmt, shape=(flat.numel(), fmt.shape[1])),
        )
        return dequantize(rows).reshape(*index.shape, -1)
    # Grouped along the rows: row r is element r % size of group r // size, in every column.
    size, bits = fmt.config.group_size, fmt.config.bits
    group, within = flat // size, flat % size
    if bits == 8:
        codes = q.codes[0, 0, group, within]  # (n, cols)
    else:  # pack_codes: the group's first half in the low nibbles, the second in the high
        half = size // 2
        packed = q.codes[0, 0, group, within % half]  # (n, cols)
        codes = torch.where((within < half)[:, None], packed & 0x0F, packed >> 4)
    # The same addcmul as dequantize, element by element: bit-identical rows.
    values = torch.addcmul(q.minimum[0, 0, group, 0], codes.to(fmt.dtype), q.scale[0, 0, group, 0])
    return values.reshape(*index.shape, -1)


def linear(x: torch.Tensor, q: QuantizedTensor | TiledInt4, chunk_rows: int = 4096) -> torch.Tensor:
    """``F.linear(x, dequantize(q))`` for a weight grouped along its output rows (dim 0),
    dequantizing ``chunk_rows`` output rows at a time into one reused buffer, so a large matrix
    (an LM head) is never dequantized whole.

    Args:
        x: (..., in) inputs.
        q: A quantized (out, in) weight.
        chunk_rows: Output rows per chunk (rounded to whole groups).

    Returns:
        (..., out) in ``x``'s dtype.
    """
    if isinstance(q, TiledInt4):
        return int4_tiled.chunked_linear(x, q, chunk_rows)
    fmt = q.format
    out_features = fmt.shape[0]
    if len(fmt.shape) != 2 or fmt.config.dim != 0:
        return torch.nn.functional.linear(x, dequantize(q))
    size = fmt.config.group_size
    per_chunk = max(1, chunk_rows // size)
    groups = q.codes.shape[2]
    result = x.new_empty((*x.shape[:-1], out_features))
    buffer = torch.empty((per_chunk * size, fmt.shape[1]), dtype=fmt.dtype, device=x.device)
    for first in range(0, groups, per_chunk):
        last = min(groups, first + per_chunk)
        rows = min(out_features, last * size) - first * size
        part = QuantizedTensor(
            codes=q.codes[:, :, first:last],
            scale=q.scale[:, :, first:last],
            minimum=q.minimum[:, :, first:last],
            format=replace(fmt, shape=(rows, fmt.shape[1])),
        )
        weight = dequantize(part, out=buffer[:rows])
        result[..., first * size : first * size + rows] = x @ weight.t()
    return result


def quantize_rows_to_bytes(
    read_rows: Callable[[int, int], torch.Tensor], fmt: QuantFormat, block_bytes: int = 1 << 26
) -> torch.Tensor:
    """``to_bytes(quantize(matrix, fmt.config))`` computed a block of rows at a time, so
    quantizing a large matrix never holds more than a block of it in floating point.

    Args:
        read_rows: ``read_rows(start, stop)`` returns rows ``[start, stop)`` of the matrix, in
            ``fmt.dtype``, on the device to quantize on.
        fmt: The matrix's format (2-D).
        block_bytes: About how many bytes of input each block holds.

    Returns:
        The matrix's bytes, (fmt.nbytes,) uint8 on the blocks' device.
    """
    rows, cols = fmt.shape
    size = fmt.config.group_size
    step = max(1, block_bytes // max(1, cols * fmt.dtype.itemsize))
    if fmt.tiled:
        return int4_tiled.pack_rows_to_bytes(
            lambda a, b: quantize(read_rows(a, b), fmt.config), fmt, step
        )
    if fmt.config.dim == 0:  # blocks of whole groups
        step = max(size, step // size * size)
    out, offsets = None, None
    for start in range(0, rows, step):
        q = quantize(read_rows(start, min(rows, start + step)), fmt.config)
        parts = [t.reshape(-1).view(torch.uint8) for t in (q.scale, q.minimum, q.codes)]
        if out is None:
            out = torch.zeros(fmt.nbytes, dtype=torch.uint8, device=parts[0].device)
            pairs = fmt.dims[0] * fmt.dims[1] * fmt.dims[3] * fmt.dtype.itemsize
            offsets = [0, pairs, 2 * pairs]
        for i, part in enumerate(parts):
            out[offsets[i] : offsets[i] + part.numel()] = part
            offsets[i] += part.numel()
    return out
