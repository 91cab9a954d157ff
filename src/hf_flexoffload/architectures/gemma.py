"""Gemma 2 and Gemma 3 (text): four ``(1 + w)`` RMS norms per layer and scaled embeddings.

Both: every layer normalizes before and after attention and before and after the MLP
(``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
``post_feedforward_layernorm``), with Gemma's RMS norm that scales by ``1 + weight`` in fp32;
embeddings are multiplied by ``sqrt(hidden_size)``; the MLP is gated with GELU-tanh; queries
are scaled by ``query_pre_attn_scalar ** -0.5``; local layers have a sliding window
(``config.layer_types``).

* Gemma 2: attention-logit and final-logit soft-capping (transformers runs its attention eagerly
  for the former; so does ``layers.attention``), local and global layers alternating.
* Gemma 3: q and k RMS-normed per head, five local layers to one global, a rotary embedding of
  its own per layer type (``rope_parameters["sliding_attention"]`` and ``["full_attention"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .decoder import Decoder, Names, common_fields

GEMMA_NAMES = Names(
    post_attn="post_attention_layernorm",
    pre_mlp="pre_feedforward_layernorm",
    post_mlp="post_feedforward_layernorm",
)


def _gemma_fields(config, per_type_rope: bool) -> dict:
    return dict(
        **common_fields(config, per_type_rope=per_type_rope),
        norm="rms_offset",
        norm_eps=config.rms_norm_eps,
        qkv_bias=(bool(config.attention_bias),) * 3,
        o_bias=bool(config.attention_bias),
        attn_scale=config.query_pre_attn_scalar**-0.5,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        embed_scale=config.hidden_size**0.5,
        activation=config.hidden_activation,
    )


@dataclass(frozen=True, kw_only=True)
class Gemma2Shape(Decoder):
    """The parts of a ``Gemma2Config`` the math needs."""

    model_type: ClassVar[str] = "gemma2"
    names: ClassVar[Names] = GEMMA_NAMES

    @classmethod
    def from_config(cls, config) -> Gemma2Shape:
        return cls(
            **_gemma_fields(config, per_type_rope=False),
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
        )


@dataclass(frozen=True, kw_only=True)
class Gemma3TextShape(Decoder):
    """The parts of a ``Gemma3TextConfig`` the math needs."""

    model_type: ClassVar[str] = "gemma3_text"
    names: ClassVar[Names] = GEMMA_NAMES

    @classmethod
    def from_config(cls, config) -> Gemma3TextShape:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            # transformers' default (sdpa) attention ignores it for Gemma 3: refuse rather
            # than pick one of two answers.
            raise ValueError(
                "gemma3_text with attn_logit_softcapping set is not supported: transformers' "
                "sdpa attention ignores it while its eager attention applies it. Set it to None."
            )
        params = getattr(config, "rope_parameters", None) or {}
        per_type = any(isinstance(v, dict) for v in params.values())
        return cls(**_gemma_fields(config, per_type_rope=per_type), qk_norm="head")
