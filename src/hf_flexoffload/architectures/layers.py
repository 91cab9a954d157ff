"""Building blocks shared by the architectures, as pure functions of plain tensors.

Positions from the attention mask, attention with padding, grouped queries, sliding windows and
soft-capping, and the lookups and projections that read embedding matrices which may be stored
quantized. Each follows the transformers implementation step by step (dtype casts included) so
results match stock models bit-closely. The model-specific math lives in ``architectures/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ..formats import int4_tiled, quantized_matrix
from ..formats.compression import QuantizedTensor, TiledInt4
from ..formats.int4_tiled import KernelOperand
from ..formats.quantized_matrix import take_rows


class StreamedRows(ABC):
    """A matrix used where it is stored instead of gathered whole (the embedding and LM head,
    as ``StreamedMatrix`` in the storage layer): the math reads one only through ``take`` and
    ``linear``. Declared here so ``lookup`` and ``project`` recognize one without importing
    the storage that implements it, which builds on the math."""

    @abstractmethod
    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) -> (*ids.shape, cols) in the compute dtype."""

    @abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, matrix)``: (..., cols) -> (..., rows)."""


Matrix = torch.Tensor | QuantizedTensor | TiledInt4 | KernelOperand | StreamedRows


def positions_from_mask(
    attention_mask: torch.Tensor | None, past: int, new: int, batch: int
) -> torch.Tensor:
    """Positions of the ``new`` last tokens: counted over real tokens, never over padding."""
    if attention_mask is None:
        return torch.arange(past, past + new).expand(batch, new)
    mask = attention_mask.long()
    return (torch.cumsum(mask, dim=1) * mask - 1)[:, past:]


def lookup(weight: Matrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an embedding matrix: (b, s) -> (b, s, e); a quantized or streamed matrix
    reads (and dequantizes) only those rows. ``ids`` may be on the host (a copy made for a
    streamed matrix of the same stage): a matrix on the device gets them without a wait."""
    if isinstance(weight, KernelOperand):
        weight = weight.weight
    if isinstance(weight, StreamedRows):
        return weight.take(ids)
    if isinstance(weight, QuantizedTensor | TiledInt4):
        return take_rows(weight, ids.to(weight.codes.device, non_blocking=True))
    return F.embedding(ids.to(weight.device, non_blocking=True), weight)


def project(x: torch.Tensor, weight: Matrix) -> torch.Tensor:
    """``x @ weight.T`` for an LM head that may be quantized or streamed (a chunk at a time)."""
    if isinstance(weight, KernelOperand):
        return int4_tiled.matmul(x, weight.weight)
    if isinstance(weight, QuantizedTensor | TiledInt4):
        return quantized_matrix.linear(x, weight)
    if isinstance(weight, StreamedRows):
        return weight.linear(x)
    return F.linear(x, weight)


def linear(
    x: torch.Tensor, weight: torch.Tensor | KernelOperand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for a decoder weight, which the fetcher hands over either dense or, where
    the int4 kernel was chosen for this step, as its packed operand."""
    if isinstance(weight, KernelOperand):
        out = int4_tiled.matmul(x, weight.weight)
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float = 1.0,
    *,
    window: int | None = None,
    softcap: float | None = None,
    key_slots: torch.Tensor | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over all keys, with padding and grouped queries.

    Args:
        q: (b, H, s, d) queries for the last ``s`` positions.
        k: (b, H_kv, S, d) keys of all ``S`` positions (cached ones first); ``H`` is a multiple
            of ``H_kv`` and query head ``i`` reads key/value head ``i // (H / H_kv)``.
        v: (b, H_kv, S, d) values.
        key_mask: (b, T) 1 for real tokens, 0 for padding, over every position of the sequence
            so far (``T`` = ``S`` unless ``key_slots`` says otherwise); ``None`` = all real.
        scale: Multiplies the scores (1.0 when q is already scaled, as OPT does).
        window: Sliding window: a query sees the last ``window`` positions, itself included
            (transformers' ``kv_idx > q_idx - sliding_window``); None = all.
        softcap: Attention-logit soft-capping (Gemma 2): scores become
            ``softcap * tanh(scores / softcap)``, computed as transformers' eager attention.
        key_slots: (S,) the sequence position of each key when the keys are not the positions
            ``0..S-1`` in order (a sliding window's ring buffer).
        length: With ``key_slots``: positions so far, the queries being the last ``s`` of them.

    Returns:
        (b, s, H, d) attention output.
    """
    b, heads, s, d = q.shape
    kv_heads, total = k.shape[1], k.shape[-2]
    dtype = q.dtype
    if key_slots is None and window is None:
        allowed = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)  # (s, S)
    else:
        slots = torch.arange(total, device=q.device) if key_slots is None else key_slots
        end = total if key_slots is None else length
        queries = torch.arange(end - s, end, device=q.device)  # (s,)
        allowed = slots[None, :] <= queries[:, None]  # (s, S)
        if window is not None:
            allowed &= slots[None, :] > queries[:, None] - window
        if key_mask is not None and key_slots is not None:
            key_mask = key_mask.to(q.device)[:, key_slots]
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    # Masked scores get finfo.min, not -inf: a row that sees only padding stays finite (a NaN
    # there would leak into real rows through the cache).
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    groups = heads // kv_heads
    if softcap is not None:
        return _eager_attention(q, k, v, bias, scale, softcap, groups)
    if groups > 1 and s == 1:
        # Decode: the group's queries become the rows of one key/value head, so no copy of the
        # history is made (as transformers' sdpa path does for one query token).
        packed = q.reshape(b, kv_heads, groups, d)  # (b, H_kv, g, d)
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=bias, scale=scale)
        return out.reshape(b, heads, 1, d).transpose(1, 2)
    if groups > 1:  # prefill: repeat each key/value head for its group of queries
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (b, H, s, d)
    return out.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, H_kv, S, d) -> (b, H_kv * groups, S, d), each head repeated for its query group."""
    b, kv_heads, total, d = x.shape
    return x[:, :, None].expand(b, kv_heads, groups, total, d).reshape(b, -1, total, d)


def _eager_attention(q, k, v, bias, scale, softcap, groups) -> torch.Tensor:
    """transformers' eager attention with soft-capping, operation by operation: scores in the
    compute dtype, capped, masked, softmax in fp32 then cast back."""
    if groups > 1:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (b, H, s, S)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2)  # (b, s, H, d)
