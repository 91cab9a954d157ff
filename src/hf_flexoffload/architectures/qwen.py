"""Qwen2 and Qwen3 (and Qwen2.5, which is ``qwen2``): Llama's blocks with their differences.

* Qwen2: biases on the q, k and v projections (not on o); sliding windows on the layers
  ``config.layer_types`` marks (``use_sliding_window`` with ``max_window_layers``).
* Qwen3: an RMS norm over each head of q and k before the rotary embedding, an explicit
  ``head_dim``, biases on all four projections when ``attention_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .decoder import Decoder, common_fields


@dataclass(frozen=True, kw_only=True)
class Qwen2Shape(Decoder):
    """The parts of a ``Qwen2Config`` the math needs."""

    model_type: ClassVar[str] = "qwen2"

    @classmethod
    def from_config(cls, config) -> Qwen2Shape:
        return cls(
            **common_fields(config),
            norm_eps=config.rms_norm_eps,
            qkv_bias=(True, True, True),
            activation=config.hidden_act,
        )


@dataclass(frozen=True, kw_only=True)
class Qwen3Shape(Decoder):
    """The parts of a ``Qwen3Config`` the math needs."""

    model_type: ClassVar[str] = "qwen3"

    @classmethod
    def from_config(cls, config) -> Qwen3Shape:
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            **common_fields(config),
            norm_eps=config.rms_norm_eps,
            qkv_bias=(bias, bias, bias),
            o_bias=bias,
            qk_norm="head",
            activation=config.hidden_act,
        )
