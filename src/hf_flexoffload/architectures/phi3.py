"""Phi-3 (and Phi-3.5, Phi-4-mini): Llama's blocks with fused projections.

``qkv_proj`` holds the q, k and v rows one after the other and ``gate_up_proj`` the gate rows
then the up rows; long-context releases use ``longrope`` scaling (short and long factors chosen
by the forward's length) and some a partial rotary (``partial_rotary_factor``); the 4k releases
have a sliding window on every layer (``sliding_window``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from .llama import LlamaShape


@dataclass(frozen=True, kw_only=True)
class Phi3Shape(LlamaShape):
    """The parts of a ``Phi3Config`` the math needs."""

    model_type: ClassVar[str] = "phi3"
    partial_rotary: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config) -> Phi3Shape:
        return replace(super().from_config(config), qkv="concat", mlp="gated_fused")
