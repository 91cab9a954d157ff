"""When the CPU int4 kernel multiplies 4-bit weights, measured on this machine.

The kernel (``int4_tiled.matmul``) reads packed weights once and never writes a dequantized
copy, so it wins where a step is bound by weight bytes: few rows per layer (decode at small
batches). It computes slower per row than a dense matmul on some CPUs (on an AVX2 EPYC its
per-row cost grows ~linearly, while a dense fp32 matmul amortizes the weight over the rows), so
past some row count dequantizing and using the dense matmul is faster. That crossover depends on
the CPU and the compute dtype, so it is measured: the same (ffn, hidden) weight is timed both
ways at increasing row counts.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..formats import int4_tiled
from ..formats.compression import QuantConfig, dequantize, quantize
from ..storage.weight_layout import StageLayout
from .probe_timing import timed

logger = logging.getLogger(__name__)

# Row counts the crossover is looked for at, and the largest it is looked for at (beyond it a
# step is compute-bound and the dense matmul amortizes any weight bytes).
KERNEL_PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def kernel_rates(
    device: torch.device, dtype: torch.dtype, matrix: tuple[int, int], rows: tuple[int, ...]
) -> tuple[dict[int, float], dict[int, float]]:
    """FLOP/s of one (ffn, hidden) layer matrix at each row count: by the int4 kernel, and by
    dequantizing then the dense matmul in ``dtype``. Both empty where the kernel cannot run."""
    hidden, ffn = matrix
    config = QuantConfig(bits=4, group_size=32, dim=1)
    if not int4_tiled.kernel_available(device) or not int4_tiled.tileable(
        (ffn, hidden), config.bits, 1, config.group_size
    ):
        return {}, {}
    weight = quantize(torch.randn(ffn, hidden, device=device).to(dtype), config)
    dense = torch.empty((ffn, hidden), dtype=dtype, device=device)
    kernel, dequantizing = {}, {}
    for n in rows:
        x = torch.randn(n, hidden, device=device).to(dtype)
        flops = 2 * n * ffn * hidden
        kernel[n] = flops / timed(lambda x=x: int4_tiled.matmul(x, weight), device, repeats=3)
        dequantizing[n] = flops / timed(
            lambda x=x: F.linear(x, dequantize(weight, out=dense)), device, repeats=3
        )
        if kernel[n] < dequantizing[n] and n >= 8:
            break  # past the crossover: larger counts only widen the dense matmul's lead
    return kernel, dequantizing


def crossover(kernel: dict[int, float], dequantizing: dict[int, float]) -> int:
    """The largest row count up to which the kernel was faster at every measured count (0: it
    never was, or could not run)."""
    best = 0
    for n in sorted(kernel):
        if kernel[n] <= dequantizing[n]:
            break
        best = n
    return best


def kernel_rows(
    pinned: int | None,
    layouts: list[StageLayout],
    device: torch.device,
    dtype: torch.dtype,
    matrix: tuple[int, int],
) -> int:
    """Rows per layer up to which the fetcher hands tiled weights to the kernel: 0 when no
    weight is in the kernel's layout, else ``pinned`` (``Policy.int4_kernel_rows``) when set,
    else the crossover measured now (about a second at a 13B layer's shape, milliseconds for
    small models)."""
    if not any(f.tiled for layout in layouts for f in layout.formats.values()):
        return 0
    if pinned is not None:
        return pinned if int4_tiled.kernel_available(device) else 0
    rows = crossover(*kernel_rates(device, dtype, matrix, KERNEL_PROBE_ROWS))
    logger.info("int4 kernel: faster than dequantizing up to %d rows per layer here", rows)
    return rows
