"""Llama and Mistral: pre-norm RMS decoders with SwiGLU, the layout the other families vary.

Llama follows transformers' ``modeling_llama``: RMS norm in fp32 then cast back and scaled,
rotary cos/sin from fp32 inverse frequencies, queries scaled inside the attention,
``down(act(gate(x)) * up(x))``. Mistral is Llama with a sliding window on every layer
(``config.sliding_window``; the KV cache of each layer keeps only the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .decoder import Decoder, common_fields


@dataclass(frozen=True, kw_only=True)
class LlamaShape(Decoder):
    """The parts of a ``LlamaConfig`` the math needs."""

    model_type: ClassVar[str] = "llama"

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        """Llama's reading of a config; the families that are Llama plus a difference
        (Mistral, Qwen, Phi-3, OLMo 2) replace the fields that differ."""
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            **common_fields(config, partial_rotary=cls.partial_rotary),
            norm_eps=config.rms_norm_eps,
            qkv_bias=(bias, bias, bias),
            o_bias=bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            activation=config.hidden_act,
        )


@dataclass(frozen=True, kw_only=True)
class MistralShape(LlamaShape):
    """Mistral: Llama's blocks, a sliding window on every layer when the config sets one."""

    model_type: ClassVar[str] = "mistral"
