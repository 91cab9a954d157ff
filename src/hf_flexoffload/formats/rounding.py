"""How a quantized group's scale and minimum are chosen: pure functions over grouped tensors.

``compression.quantize`` views a tensor as ``(pre, groups, group_size, post)`` in fp32. Every
function here reduces along dim 2 and returns ``(scale, low)``, each ``(pre, groups, 1, post)``
in the stored dtype; the codes are then ``codes(grouped, scale, low, levels)``, the nearest
level of each element, which is the best choice for any fixed ``(scale, low)``. Both functions
produce the same stored format, so dequantizing costs the same whichever chose it.

* ``minmax`` (FlexGen's): the group's range, ``scale = (max - min) / levels``. No element is
  clipped, but one outlier stretches the range and leaves the others few levels.
* ``search``: tries ``SHRINKS``, a few shrinkings of the range (each end on its own), fits scale
  and minimum by weighted least squares to the codes each gives, and keeps per group the one
  with the least weighted squared error, as llama.cpp's ``make_qkx`` quantizers do. The weight
  of an element is its square plus its group's mean square (``emphasis``): errors on large
  weights count more. It never stores a pair with more (plain) squared error than min–max's:
  the final choice is checked exactly against it.

Example:
    >>> grouped = torch.tensor([0.0, 0.1, 0.2, 0.3, 3.0, 0.25]).reshape(1, 1, 6, 1)  # an outlier
    >>> for choose in (minmax, search):
    ...     print(round(float(squared_error(grouped, *choose(grouped, 3, torch.float32), 3)), 4))
    0.2025
    0.0616
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SHRINKS", "codes", "emphasis", "minmax", "round_up", "search", "squared_error"]

# (low cut, high cut) as fractions of a group's range. On SmolLM2-135M's decoder matrices (4
# bits, groups of 64 input channels, plain least squares) cuts of 0 to 6% took most of the gain:
# nine candidates lowered the relative RMS error from 8.0% (min-max) to 6.6%; sixteen, up to 9%,
# reached 6.59% at almost twice the time.
SHRINKS = tuple((low, high) for low in (0.0, 0.03, 0.06) for high in (0.0, 0.03, 0.06))


def round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (fp32) in ``dtype``, rounded towards +inf so no group's range is clipped."""
    out = values.to(dtype)
    # Branch-free: testing ``low.any()`` first would wait for the device on every call.
    up = torch.nextafter(out, torch.full_like(out, math.inf))
    return torch.where(out.float() < values, up, out)


def codes(
    grouped: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor,
    levels: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The nearest level of every element, as fp32 integers in [0, levels]; 0 where scale is 0."""
    inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
    out = torch.sub(grouped, low.float(), out=out)
    return out.mul_(inverse).round_().clamp_(0, levels)


def squared_error(
    grouped: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor,
    levels: int,
    weight: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per group, the summed squared error of ``(scale, low)`` with its nearest codes (fp32),
    with the values rounded to the stored dtype, as ``dequantize`` returns them.

    Args:
        grouped: (pre, groups, size, post) fp32.
        scale, low: (pre, groups, 1, post), as stored.
        levels: ``2**bits - 1``.
        weight: Optional 0/1 weight per element (padding counts 0), broadcastable to ``grouped``.
        work: Optional fp32 buffer of ``grouped``'s shape to compute in.
    """
    residual = codes(grouped, scale, low, levels, out=work)
    residual = torch.addcmul(low.float(), residual, scale.float(), out=residual)
    if scale.dtype != torch.float32:
        residual.copy_(residual.to(scale.dtype))
    residual.sub_(grouped)
    if weight is not None:
        residual.mul_(weight)
    return torch.linalg.vector_norm(residual, dim=2, keepdim=True).square_()


def minmax(
    grouped: torch.Tensor, levels: int, dtype: torch.dtype, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexGen's choice: the group's minimum (an element, so exact in ``dtype``) and
    ``(max - min) / levels`` rounded up to ``dtype``. ``weight`` is ignored: padding copies an
    element of the group, which changes no minimum or maximum."""
    low = grouped.amin(dim=2, keepdim=True)
    high = grouped.amax(dim=2, keepdim=True)
    return round_up((high - low) / levels, dtype), low.to(dtype)


def emphasis(grouped: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """How much each element's squared error counts in ``search``: its square plus its group's
    mean square (0 for padding, where ``weight`` is 0).

    Why: plain squared error cuts outliers off freely, and large weights matter more than their
    share of it. On SmolLM2-135M (4 bits, groups of 64 inputs) the perplexity cost of quantizing
    the decoder matrices was +33% with min-max, +26% with plain squared error, +22% with
    llama.cpp's weights (mean magnitude plus ``|x|``) and +20% with these; of the embeddings
    (also the LM head), +11.3%, +12.8%, +11.5% and +9.3%.
    """
    square = grouped.square()
    if weight is None:
        return square.add_(square.mean(dim=2, keepdim=True))
    square.mul_(weight)
    mean = square.sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True)
    return square.add_(mean).mul_(weight)


def search(
    grouped: torch.Tensor,
    levels: int,
    dtype: torch.dtype,
    weight: torch.Tensor | None = None,
    shrinks: tuple[tuple[float, float], ...] = SHRINKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-weighted-squared-error ``(scale, low)`` per group among a few candidates.

    Each candidate cuts ``shrinks[i]`` (fractions of the range) off the group's two ends, rounds
    every element to the levels of that narrower range, and fits scale and minimum to those
    codes by least squares weighted by ``emphasis``. Candidates run one after another keeping
    the best so far, so the memory is a few fp32 copies of ``grouped`` whatever their number,
    and nothing is read back on the host. The best is stored only where its exact squared error,
    after rounding to ``dtype``, is below min–max's; elsewhere (constant groups among them)
    min–max's pair is kept.

    Args:
        grouped: (pre, groups, size, post) fp32.
        levels: ``2**bits - 1``.
        dtype: The dtype scale and minimum are stored in.
        weight: Optional 0/1 weight per element (0 for padding), broadcastable to ``grouped``.
        shrinks: The (low cut, high cut) candidates; each cut in [0, 0.5).

    Returns:
        (scale, low), each (pre, groups, 1, post) in ``dtype``.
    """
    base_scale, base_low = minmax(grouped, levels, dtype)
    lo = base_low.float()
    span = grouped.amax(dim=2, keepdim=True) - lo
    # Every element's place on the min-max levels: a candidate's codes are this times a number
    # minus a number, the same for all groups, so trying one takes no per-group arithmetic.
    position = torch.sub(grouped, lo).mul_(torch.where(span > 0, levels / span, 0.0))
    sums = _Sums.of(grouped, emphasis(grouped, weight))
    work = torch.empty_like(grouped)  # every candidate's codes, in turn
    best = (torch.full_like(lo, math.inf), torch.zeros_like(lo), lo.clone())
    for cut_low, cut_high in shrinks:
        stretch = 1 / (1 - cut_low - cut_high)
        candidate = torch.mul(position, stretch, out=work).sub_(cut_low * levels * stretch)
        _keep_better(best, sums.fit(candidate.round_().clamp_(0, levels)))
    # One more step from the best: its own nearest codes, fitted again (never worse for them).
    _keep_better(best, sums.fit(codes(grouped, best[1], best[2], levels, out=work)))
    scale, low = best[1].to(dtype), best[2].to(dtype)
    better = squared_error(grouped, scale, low, levels, weight, work) < squared_error(
        grouped, base_scale, base_low, levels, weight, work
    )
    return torch.where(better, scale, base_scale), torch.where(better, low, base_low)


Fit = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (squared error, scale, low) per group


def _keep_better(best: Fit, other: Fit) -> None:
    """Per group, overwrite ``best`` with ``other`` where it has less error."""
    better = other[0] < best[0]
    for kept, new in zip(best, other, strict=True):
        torch.where(better, new, kept, out=kept)


@dataclass(frozen=True)
class _Sums:
    """A group's weighted element count, sum and sum of squares, for weighted least squares.

    The per-group arithmetic is written in fused ops (``addcmul``): groups are many (a 16th or
    32nd of the elements), so each op on them costs as much as a cheap pass over the elements.
    """

    grouped: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    total: torch.Tensor
    energy: torch.Tensor
    work: torch.Tensor  # the weighted codes of each fit, in turn

    @classmethod
    def of(cls, grouped: torch.Tensor, weight: torch.Tensor) -> _Sums:
        weighted = grouped * weight
        total, energy = weighted.sum(2, True), _dot(weighted, grouped)
        return cls(grouped, weight, weight.sum(2, True), total, energy, weighted)

    def fit(self, codes: torch.Tensor) -> Fit:
        """The weighted least-squares scale and minimum for ``codes``, and their error."""
        weighted = torch.mul(codes, self.weight, out=self.work)
        sum_q = weighted.sum(2, True)
        sum_qx = _dot(weighted, self.grouped)
        det = torch.addcmul(_dot(weighted, codes) * self.count, sum_q, sum_q, value=-1)
        scale = torch.addcmul(sum_qx * self.count, sum_q, self.total, value=-1).div_(det)
        # det is 0 when all codes are equal; codes rise with the values, so only rounding can
        # make the scale negative.
        scale = torch.where(det > 0, scale, 0.0).clamp_(min=0)
        low = torch.addcmul(self.total, scale, sum_q, value=-1).div_(self.count)
        # The residual from the sums: cancellation makes it approximate, which only matters for
        # ranking candidates; ``search`` checks its final choice exactly.
        error = torch.addcmul(self.energy, scale, sum_qx, value=-1)
        return error.addcmul_(low, self.total, value=-1), scale, low


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per group, ``(a * b).sum(2)`` without the product's temporary."""
    return torch.einsum("pgsq,pgsq->pgq", a, b).unsqueeze(2)
