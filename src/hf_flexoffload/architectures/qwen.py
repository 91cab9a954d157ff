"""Qwen2 and Qwen3 (and Qwen2.5, which is ``qwen2``): Llama's blocks with their differences.

* Qwen2: biases on the q, k and v projections (not on o); sliding windows on the layers
  ``config.layer_types`` marks (``use_sliding_window`` with ``max_window_layers``).
* Qwen3: an RMS norm over each head of q and k before the rotary embedding, an explicit
  ``head_dim``, biases on all four projections when ``attention_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from .llama import LlamaShape


@dataclass(frozen=True, kw_only=True)
class Qwen2Shape(LlamaShape):
    """The parts of a ``Qwen2Config`` the math needs."""

    model_type: ClassVar[str] = "qwen2"

    @classmethod
    def from_config(cls, config) -> Qwen2Shape:
        return replace(super().from_config(config), qkv_bias=(True, True, True), o_bias=False)


@dataclass(frozen=True, kw_only=True)
class Qwen3Shape(LlamaShape):
    """The parts of a ``Qwen3Config`` the math needs."""

    model_type: ClassVar[str] = "qwen3"

    @classmethod
    def from_config(cls, config) -> Qwen3Shape:
        return replace(super().from_config(config), qk_norm="head")
