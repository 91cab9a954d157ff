"""Llama: weight names and math (RMS norm, rotary embeddings, grouped-query attention, SwiGLU).

Follows transformers' ``modeling_llama`` step by step: RMS norm in fp32 then cast back and scaled,
rotary cos/sin from fp32 inverse frequencies, queries scaled inside the attention (not before),
``down(act(gate(x)) * up(x))``. Positions come from the attention mask (the caller's
``position_ids``), so left-padded rows rotate as stock transformers rotates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Architecture, Attend, TensorList, Weights, linear_specs
from .layers import linear, lookup, project, rms_norm
from .rope import Rope, apply_rotary

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass(frozen=True, kw_only=True)
class LlamaShape(Architecture):
    """The parts of a ``LlamaConfig`` the math needs."""

    model_type: ClassVar[str] = "llama"
    embeddings: ClassVar[frozenset[str]] = frozenset({"embed_tokens.weight", "lm_head.weight"})

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    max_positions: int
    rms_norm_eps: float
    rope: Rope
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tied_head: bool = False

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}: grouped-query attention needs it to be."
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"LlamaConfig.hidden_act={self.activation!r} is not supported; "
                f"allowed: {sorted(_ACTIVATIONS)}."
            )

    @property
    def embed_dim(self) -> int:
        return self.hidden

    @property
    def workspace_width(self) -> int:
        # q and the attention output (H·d), k and v (H_kv·d), residual and normed input, and
        # gate, up and their product (ffn each).
        attn = 2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return attn + 2 * self.hidden + 3 * self.ffn

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise ValueError(
                f"LlamaConfig.pretraining_tp={config.pretraining_tp} is not supported "
                "(transformers ignores it too); set it to 1."
            )
        return cls(
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            ffn=config.intermediate_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope=Rope.from_config(config, head_dim),
            activation=config.hidden_act,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tied_head=bool(getattr(config, "tie_word_embeddings", False)),
        )

    # -- weights -------------------------------------------------------------------------------

    def stage_tensors(self) -> list[TensorList]:
        # The MLP's three matrices come last in a layer: used last, they go to slower tiers.
        h, f, d = self.hidden, self.ffn, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        layer = [
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
            *linear_specs("self_attn.q_proj", q, h, self.attention_bias),
            *linear_specs("self_attn.k_proj", kv, h, self.attention_bias),
            *linear_specs("self_attn.v_proj", kv, h, self.attention_bias),
            *linear_specs("self_attn.o_proj", h, q, self.attention_bias),
            *linear_specs("mlp.gate_proj", f, h, self.mlp_bias),
            *linear_specs("mlp.up_proj", f, h, self.mlp_bias),
            *linear_specs("mlp.down_proj", h, f, self.mlp_bias),
        ]
        head = [("norm.weight", (h,))]
        if not self.tied_head:
            head.append(("lm_head.weight", (self.vocab, h)))
        embed = [("embed_tokens.weight", (self.vocab, h))]
        return [embed] + [list(layer) for _ in range(self.layers)] + [head]

    def checkpoint_name(self, stage: int, local: str) -> str:
        if local == "lm_head.weight":
            return "lm_head.weight"
        if 1 <= stage <= self.layers:
            return f"layers.{stage - 1}.{local}"
        return local

    # -- math ----------------------------------------------------------------------------------

    def embed(
        self, w: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings: (b, s) ids -> (b, s, h); positions enter in every layer's rotary."""
        return lookup(w["embed_tokens.weight"], input_ids)

    def decoder_layer(
        self, w: Weights, x: torch.Tensor, position_ids: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """One Llama decoder layer on (b, s, h) hidden states at (b, s) positions."""
        b, s, _ = x.shape
        h = rms_norm(x, w["input_layernorm.weight"], self.rms_norm_eps)
        q = _lin(h, w, "self_attn.q_proj").view(b, s, self.heads, self.head_dim)
        k = _lin(h, w, "self_attn.k_proj").view(b, s, self.kv_heads, self.head_dim)
        v = _lin(h, w, "self_attn.v_proj").view(b, s, self.kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(position_ids, x.dtype)  # (b, s, 1, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = attend(q, k, v, scale=self.head_dim**-0.5)  # (b, s, H, d)
        x = x + _lin(attn.reshape(b, s, self.heads * self.head_dim), w, "self_attn.o_proj")
        h = rms_norm(x, w["post_attention_layernorm.weight"], self.rms_norm_eps)
        gate = _ACTIVATIONS[self.activation](_lin(h, w, "mlp.gate_proj"))
        return x + _lin(gate * _lin(h, w, "mlp.up_proj"), w, "mlp.down_proj")

    def head(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """Final RMS norm and LM head: (b, s, h) -> (b, s, vocab) logits."""
        x = rms_norm(x, w["norm.weight"], self.rms_norm_eps)
        return project(x, w["lm_head.weight"])


def _lin(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))
