"""Quantized matrices a piece at a time: a few rows looked up, a projection a chunk of rows at a
time, and a matrix quantized a block of rows at a time, so that no large matrix (an embedding,
an LM head) is ever held whole in floating point.

Example:
    >>> q = quantize(torch.randn(1000, 64), QuantConfig())
    >>> torch.equal(take_rows(q, torch.tensor([3, 999])), dequantize(q)[[3, 999]])
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from . import int4_tiled
from .compression import QuantFormat, QuantizedTensor, TiledInt4, dequantize, quantize

__all__ = ["linear", "quantize_rows_to_bytes", "take_rows"]


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
    """``F.linear(x, dequantize(q))`` for a quantized (out, in) weight, dequantizing
    ``chunk_rows`` output rows at a time into one reused buffer, so a large matrix (an LM head)
    is never dequantized whole: the extra memory is one chunk of rows in the weight's dtype.

    Args:
        x: (..., in) inputs.
        q: A quantized (out, in) weight, grouped along either dimension.
        chunk_rows: Output rows per chunk; rounded down to whole groups when the groups run
            down the rows (dim 0). Grouped along the rows (dim 1), every row is independent.

    Returns:
        (..., out) in ``x``'s dtype.
    """
    if isinstance(q, TiledInt4):
        return int4_tiled.chunked_linear(x, q, chunk_rows)
    fmt = q.format
    if len(fmt.shape) != 2:
        return torch.nn.functional.linear(x, dequantize(q))
    out_features, size = fmt.shape[0], fmt.config.group_size
    step = chunk_rows if fmt.config.dim == 1 else max(1, chunk_rows // size) * size
    result = x.new_empty((*x.shape[:-1], out_features))
    buffer = torch.empty((min(step, out_features), fmt.shape[1]), dtype=fmt.dtype, device=x.device)
    for start in range(0, out_features, step):
        stop = min(out_features, start + step)
        weight = dequantize(_rows(q, start, stop), out=buffer[: stop - start])
        result[..., start:stop] = x @ weight.t()
    return result


def _rows(q: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Rows ``[start, stop)`` of a quantized matrix as views (``start`` a multiple of the group
    size when the groups run down the rows)."""
    fmt = q.format
    if fmt.config.dim == 1:  # (1, out, G, g, 1): a row is one index of ``pre``
        index = (slice(None), slice(start, stop))
    else:  # (1, 1, G, g, in): rows come in groups
        size = fmt.config.group_size
        index = (slice(None), slice(None), slice(start // size, -(-stop // size)))
    return QuantizedTensor(
        codes=q.codes[index],
        scale=q.scale[index],
        minimum=q.minimum[index],
        format=replace(fmt, shape=(stop - start, fmt.shape[1])),
    )


def quantize_rows_to_bytes(
    read_rows: Callable[[int, int], torch.Tensor], fmt: QuantFormat, block_bytes: int = 1 << 26
) -> torch.Tensor:
    """``to_bytes(quantize(matrix, fmt.config))`` computed a block of rows at a time, so
    quantizing a large matrix never holds more than a block of it in floating point.

    Args:
        read_rows: ``read_rows(start, stop)`` returns rows ``[start, stop)`` of the matrix, in
            ``fmt.dtype``, on the device to quantize on.
        fmt: The matrix's format (2-D).
        block_bytes: About how many bytes of input each block holds (a quarter for the search).

    Returns:
        The matrix's bytes, (fmt.nbytes,) uint8 on the blocks' device.
    """
    rows, cols = fmt.shape
    size = fmt.config.group_size
    if fmt.config.rounding != "minmax":
        # The search holds five fp32 copies of its block (the values, their emphasis, their
        # places on the min-max levels, a candidate's codes and their weighted copy) where
        # min-max holds about three: quarter blocks keep its peak below min-max's.
        block_bytes //= 4
    step = max(1, block_bytes // max(1, cols * fmt.dtype.itemsize))
    if fmt.tiled:
        return int4_tiled.pack_rows_to_bytes(
            lambda a, b: quantize(read_rows(a, b), fmt.config), fmt, step
        )
    if fmt.config.dim == 0:  # blocks of whole groups
        step = max(size, step // size * size)
    out, offsets = None, None
    for start in range(0, rows, step):
        q = quantize(read_rows(start, min(rows, start + step)), fmt.config, tile=False)
        parts = [t.reshape(-1).view(torch.uint8) for t in (q.scale, q.minimum, q.codes)]
        if out is None:
            out = torch.zeros(fmt.nbytes, dtype=torch.uint8, device=parts[0].device)
            pairs = fmt.dims[0] * fmt.dims[1] * fmt.dims[3] * fmt.dtype.itemsize
            offsets = [0, pairs, 2 * pairs]
        for i, part in enumerate(parts):
            out[offsets[i] : offsets[i] + part.numel()] = part
            offsets[i] += part.numel()
    return out
