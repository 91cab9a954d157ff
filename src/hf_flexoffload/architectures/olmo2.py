"""OLMo 2: post-norm layers and q/k norms over the whole projection.

The norms come after attention and after the MLP, before each residual add
(``post_attention_layernorm``, ``post_feedforward_layernorm``; nothing normalizes a layer's
input), and q and k are RMS-normed across all heads before they are split into heads. OLMo 2's
RMS norm scales in fp32 before casting back (``norms.py``: ``rms_fp32``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from .decoder import Names
from .llama import LlamaShape


@dataclass(frozen=True, kw_only=True)
class Olmo2Shape(LlamaShape):
    """The parts of an ``Olmo2Config`` the math needs."""

    model_type: ClassVar[str] = "olmo2"
    names: ClassVar[Names] = Names(
        pre_attn=None,
        post_attn="post_attention_layernorm",
        pre_mlp=None,
        post_mlp="post_feedforward_layernorm",
    )

    @classmethod
    def from_config(cls, config) -> Olmo2Shape:
        return replace(super().from_config(config), norm="rms_fp32", qk_norm="projection")
