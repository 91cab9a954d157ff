"""4-bit weight matrices stored in the operand layout of PyTorch's CPU int4 matmul kernel.

A (N, K) weight quantized with 4 bits in groups of ``g`` consecutive *input* features is stored
as one record of two parts, exactly the operands of ``torch.ops.aten._weight_int4pack_mm_for_cpu``:

* ``scale_zero``: (K / g, N, 2) bf16, per group its scale and the value of code 8;
* ``codes``: (N / 32, K, 16) uint8: within each block of 32 output rows and for every input
  feature, byte ``i`` holds row ``i``'s code in its low nibble and row ``i + 16``'s in its high.

An element is ``(code - 8) * scale + zero``, the same asymmetric affine 4-bit code as the other
formats (``zero = minimum + 8 * scale``). Because the bytes *are* the kernel's operands, a matmul
reads the stored bytes once, as they are: no dequantized copy of the weight is ever written
(``matmul``). ``dequantize`` reads the same bytes on any device, for the path that is always
available. Scales are bf16 whatever the model's dtype, since the kernel takes nothing else; the
codes are chosen against the bf16-rounded scale and zero, so both paths compute from the values
the quantizer optimized for.

The layout applies where the kernel can run it (``tileable``): a 2-D weight grouped along its
input features, ``N`` a multiple of 32, ``g`` one of the kernel's group sizes dividing ``K``.

The stored layout is the same on every machine (blocks of 32 rows), but torch's kernel takes
blocks of 64 rows (byte ``i``: rows ``i`` and ``i + 32``) where it runs its AVX-512 code
(``kernel_block`` probes which): there ``matmul`` re-tiles the codes on the way in (a pass over
the packed bytes, still no dequantized copy), and multiplies a weight whose rows are not a
multiple of 64 by the dequantizing path, so the answer is right on every CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .compression import QuantFormat

BLOCK = 32  # output rows per tile of the kernel's layout
KERNEL_GROUPS = (32, 64, 128, 256)
SCALE_DTYPE = torch.bfloat16
_MIDDLE = 8  # the code whose value is ``zero``


def tileable(shape: tuple[int, ...], bits: int, dim: int, group_size: int) -> bool:
    """Whether a tensor of ``shape`` quantized so is stored in the kernel's layout."""
    if bits != 4 or len(shape) != 2 or dim != 1 or group_size not in KERNEL_GROUPS:
        return False
    rows, cols = shape
    return rows % BLOCK == 0 and cols % group_size == 0


def record_bytes(shape: tuple[int, ...], group_size: int) -> int:
    rows, cols = shape
    return 2 * SCALE_DTYPE.itemsize * (cols // group_size) * rows + rows * cols // 2


@dataclass(frozen=True)
class TiledInt4:
    """A 4-bit (N, K) weight in the kernel's layout, as plain tensors.

    Attributes:
        codes: (N / 32, K, 16) uint8.
        scale_zero: (K / g, N, 2) bf16: scale, and the value of code 8.
        format: Shape, dtype (of the dequantized weight) and config.
    """

    codes: torch.Tensor
    scale_zero: torch.Tensor
    format: QuantFormat

    @property
    def shape(self) -> tuple[int, ...]:
        return self.format.shape


def pack(x: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> TiledInt4:
    """Codes for ``x`` given each group's range, in the kernel's layout.

    Args:
        x: (N, K) weight rows (any floating dtype).
        low: (N, K / g) fp32 value of code 0 of each group.
        scale: (N, K / g) fp32 step of each group (0 for a constant group).
        fmt: The format (``tileable``).
    """
    rows, cols = x.shape
    size = fmt.config.group_size
    groups = cols // size
    zero = (low + _MIDDLE * scale).to(SCALE_DTYPE)  # (N, G)
    step = scale.to(SCALE_DTYPE)
    # Codes against the stored (rounded) values, so dequantizing reproduces what was optimized.
    grouped = x.float().reshape(rows, groups, size)
    inverse = torch.where(step > 0, step.float().reciprocal(), 0.0)[..., None]
    codes = ((grouped - zero.float()[..., None]) * inverse).round_().add_(_MIDDLE)
    codes = codes.clamp_(0, 15).to(torch.uint8).reshape(rows // BLOCK, BLOCK, cols)
    tiles = codes.transpose(1, 2)  # (N / 32, K, 32)
    half = BLOCK // 2
    packed = (tiles[..., :half] | (tiles[..., half:] << 4)).contiguous()  # (N / 32, K, 16)
    scale_zero = torch.stack((step, zero), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return TiledInt4(codes=packed, scale_zero=scale_zero, format=fmt)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N / 32, K, 16) packed bytes -> (N, K) uint8 codes."""
    blocks, cols, half = codes.shape
    out = torch.empty((blocks, BLOCK, cols), dtype=torch.uint8, device=codes.device)
    # Two strided byte copies, rather than concatenating the nibbles and transposing the result.
    out[:, :half].copy_((codes & 0x0F).transpose(1, 2))
    out[:, half:].copy_((codes >> 4).transpose(1, 2))
    return out.view(blocks * BLOCK, cols)


def _affine(scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, n, 2) pairs -> fp32 (n, G, 1) scale and value of code 0, so an element is one
    ``addcmul`` of its code (the same arithmetic in ``dequantize`` and ``take_rows``)."""
    pairs = scale_zero.float()
    scale, zero = pairs[..., 0], pairs[..., 1]
    return scale.t()[..., None], (zero - _MIDDLE * scale).t()[..., None]


def dequantize(q: TiledInt4, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) weight in ``q.format.dtype``, on ``q``'s device (into ``out`` if given)."""
    rows, cols = q.shape
    size = q.format.config.group_size
    codes = unpack_codes(q.codes).view(rows, cols // size, size)
    scale, low = _affine(q.scale_zero)
    if out is None:
        out = torch.empty(q.shape, dtype=q.format.dtype, device=q.codes.device)
    if out.dtype == torch.float32:  # written in place: no fp32 temporary of the whole matrix
        torch.addcmul(low, codes, scale, out=out.view(rows, cols // size, size))
        return out
    return out.copy_(torch.addcmul(low, codes, scale).reshape(rows, cols))


def take_rows(q: TiledInt4, index: torch.Tensor) -> torch.Tensor:
    """``dequantize(q)[index]``, reading only those rows: (*index.shape, K)."""
    flat = index.reshape(-1)
    cols = q.shape[1]
    size = q.format.config.group_size
    half = BLOCK // 2
    within = flat % BLOCK
    packed = q.codes[flat // BLOCK, :, within % half]  # (n, K)
    codes = torch.where((within < half)[:, None], packed & 0x0F, packed >> 4)
    scale, low = _affine(q.scale_zero[:, flat])  # (n, G, 1)
    grouped = codes.view(flat.numel(), cols // size, size)
    values = torch.addcmul(low, grouped, scale).reshape(flat.numel(), cols)
    return values.to(q.format.dtype).reshape(*index.shape, cols)


def row_block(q: TiledInt4, start: int, stop: int) -> TiledInt4:
    """Output rows ``[start, stop)`` (multiples of 32) as their own weight."""
    fmt = replace(q.format, shape=(stop - start, q.shape[1]))
    return TiledInt4(
        codes=q.codes[start // BLOCK : -(-stop // BLOCK)],
        scale_zero=q.scale_zero[:, start:stop],
        format=fmt,
    )


def to_bytes(q: TiledInt4) -> torch.Tensor:
    """The record: scale/zero pairs, then codes, as (nbytes,) uint8."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in (q.scale_zero, q.codes)]
    return torch.cat(parts)


def from_bytes(data: torch.Tensor, fmt: QuantFormat) -> TiledInt4:
    """Views of a record's two parts (no copy)."""
    rows, cols = fmt.shape
    groups = cols // fmt.config.group_size
    pair_bytes = 2 * SCALE_DTYPE.itemsize * groups * rows
    scale_zero = data[:pair_bytes].view(SCALE_DTYPE).view(groups, rows, 2)
    codes = data[pair_bytes:].view(rows // BLOCK, cols, BLOCK // 2)
    return TiledInt4(codes=codes, scale_zero=scale_zero, format=fmt)


@functools.cache
def kernel_block() -> int:
    """Output rows per tile of this CPU's int4 kernel layout: 32 (AVX2 and others) or 64
    (AVX-512), found by packing a known weight whose rows' codes tell them apart (a fact of
    the machine and the torch build, so probed once)."""
    codes = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 64).contiguous()
    first = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(-1)[0])
    # Byte 0 holds row 0 (code 0) and, above it, row 16 (code 1) or row 32 (code 2).
    return {0x10: 32, 0x20: 64}[first]


def kernel_codes(q: TiledInt4) -> torch.Tensor | None:
    """``q``'s codes as the kernel on this CPU takes them, (N, K / 2) uint8: the stored bytes
    themselves where its tiles are 32 rows, re-tiled where they are 64; None where the rows do
    not fill its tiles."""
    rows, cols = q.shape
    block = kernel_block()
    if block == BLOCK:
        return q.codes.view(rows, cols // 2)
    if rows % block:
        return None
    tiles = unpack_codes(q.codes).view(rows // block, block, cols).transpose(1, 2)
    half = block // 2
    packed = tiles[..., :half] | (tiles[..., half:] << 4)  # (N / 64, K, 32)
    return packed.contiguous().view(rows, cols // 2)


def kernel_available(device: torch.device) -> bool:
    """Whether ``matmul`` runs on ``device``: the CPU kernel exists in this torch."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def matmul(x: torch.Tensor, q: TiledInt4) -> torch.Tensor:
    """``x @ dequantize(q).T`` by the CPU kernel, reading the packed bytes as they are.

    The kernel takes bf16 (or fp16) activations: others are rounded to bf16 on the way in and
    the result is returned in ``x``'s dtype. That rounding is the only difference from the
    dequantizing path.

    Args:
        x: (..., K) on the CPU.
        q: The weight.

    Returns:
        (..., N) in ``x``'s dtype.
    """
    rows, cols = q.shape
    codes = kernel_codes(q)
    if codes is None:  # rows this CPU's kernel cannot tile: the dequantizing path
        return chunked_linear(x, q)
    act = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    flat = x.reshape(-1, cols).to(act).contiguous()
    scale_zero = q.scale_zero if act == SCALE_DTYPE else q.scale_zero.to(act)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        flat, codes, q.format.config.group_size, scale_zero
    )
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)


def chunked_linear(x: torch.Tensor, q: TiledInt4, chunk_rows: int = 4096) -> torch.Tensor:
    """``x @ dequantize(q).T`` on any device, dequantizing ``chunk_rows`` output rows at a time
    into one reused buffer (a large LM head is never dequantized whole).

    Args:
        x: (..., K) inputs.
        q: The weight.
        chunk_rows: Output rows per chunk (rounded down to whole tiles, at least one).

    Returns:
        (..., N) in ``x``'s dtype.
    """
    rows, cols = q.shape
    step = max(BLOCK, chunk_rows // BLOCK * BLOCK)
    result = x.new_empty((*x.shape[:-1], rows))
    buffer = torch.empty((min(step, rows), cols), dtype=q.format.dtype, device=x.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        weight = dequantize(row_block(q, start, stop), out=buffer[: stop - start])
        result[..., start:stop] = x @ weight.t()
    return result


@dataclass(frozen=True)
class KernelOperand:
    """A tiled weight handed to the math to be multiplied by the kernel (``matmul``), not
    dequantized: the weight fetcher chooses this where the measured kernel beats dequantizing
    for the step's row count."""

    weight: TiledInt4


def pack_rows_to_bytes(
    quantize_rows: Callable[[int, int], TiledInt4], fmt: QuantFormat, step: int
) -> torch.Tensor:
    """The record of a (N, K) weight quantized a block of whole tiles at a time.

    Args:
        quantize_rows: ``quantize_rows(start, stop)`` is rows ``[start, stop)`` quantized.
        fmt: The weight's format.
        step: About how many rows per block (rounded to whole tiles).
    """
    rows = fmt.shape[0]
    step = max(BLOCK, step // BLOCK * BLOCK)
    out = None
    for start in range(0, rows, step):
        part = quantize_rows(start, min(rows, start + step))
        if out is None:
            out = torch.empty(fmt.nbytes, dtype=torch.uint8, device=part.codes.device)
            whole = from_bytes(out, fmt)
        stop = start + part.shape[0]
        whole.scale_zero[:, start:stop] = part.scale_zero
        whole.codes[start // BLOCK : stop // BLOCK] = part.codes
    return out
