"""The normalizations the families use, each as transformers computes it (dtype casts in the
same order), so results match stock models bit for bit.

* ``rms``: Llama's RMS norm (Qwen, Mistral, Phi-3): normalized in fp32, cast back, then scaled.
* ``rms_fp32``: OLMo 2's: normalized and scaled in fp32, then cast back.
* ``rms_offset``: Gemma's: normalized in fp32, scaled by ``1 + weight`` in fp32, cast back.
* ``layer``: LayerNorm with weight and bias (GPT-NeoX).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("rms", "rms_fp32", "rms_offset", "layer")


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMS norm: normalized in fp32, cast back, then scaled (in that order, as HF)."""
    return weight * _normalized(x, eps).to(x.dtype)


def norm(
    kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Normalize the last dimension of ``x`` (any shape) the ``kind`` way (one of ``NORMS``)."""
    if kind == "rms":
        return rms_norm(x, weight, eps)
    if kind == "rms_fp32":
        return (weight * _normalized(x, eps)).to(x.dtype)
    if kind == "rms_offset":
        return (_normalized(x, eps) * (1.0 + weight.float())).type_as(x)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    raise ValueError(f"Unknown norm kind {kind!r}; known: {list(NORMS)}.")
