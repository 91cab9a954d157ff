"""OPT: weight names and math.

The math follows transformers' ``modeling_opt`` step by step (q is scaled before the matmul,
learned positions are offset by 2) so results match stock OPT. Covers the pre-LN 125m-style
layout and the post-LN 350m-style one with ``word_embed_proj_dim`` projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Architecture, Attend, TensorList, Weights, linear_specs
from .layers import linear, lookup, project

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (a fairseq legacy)


@dataclass(frozen=True)
class OPTShape(Architecture):
    """The parts of an ``OPTConfig`` the math needs."""

    model_type: ClassVar[str] = "opt"
    embeddings: ClassVar[frozenset[str]] = frozenset(
        {"embed_tokens.weight", "embed_positions.weight", "lm_head.weight"}
    )

    hidden: int
    heads: int
    ffn: int
    layers: int
    vocab: int
    max_positions: int
    embed_dim: int  # word_embed_proj_dim
    pre_layer_norm: bool
    final_layer_norm: bool
    bias: bool
    layer_norm_affine: bool
    activation: str
    tied_head: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_heads(self) -> int:
        return self.heads

    @property
    def projects(self) -> bool:
        return self.embed_dim != self.hidden

    @property
    def head_flops(self) -> int:
        return 2 * self.vocab * self.embed_dim + 2 * self.hidden * self.embed_dim

    @classmethod
    def from_config(cls, config) -> OPTShape:
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"OPTConfig.activation_function={config.activation_function!r} is not supported; "
                f"allowed: {sorted(_ACTIVATIONS)}."
            )
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"OPTConfig.hidden_size={config.hidden_size} is not divisible by "
                f"num_attention_heads={config.num_attention_heads}."
            )
        return cls(
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            ffn=config.ffn_dim,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
            embed_dim=config.word_embed_proj_dim,
            pre_layer_norm=config.do_layer_norm_before,
            final_layer_norm=config.do_layer_norm_before
            and not getattr(config, "_remove_final_layer_norm", False),
            bias=config.enable_bias,
            layer_norm_affine=config.layer_norm_elementwise_affine,
            activation=config.activation_function,
            tied_head=bool(getattr(config, "tie_word_embeddings", True)),
        )

    # -- weights -------------------------------------------------------------------------------

    def stage_tensors(self) -> list[TensorList]:
        # fc1/fc2 come last in a layer: used last, they are the ones cut to slower tiers.
        h, f = self.hidden, self.ffn
        embed = [
            ("embed_tokens.weight", (self.vocab, self.embed_dim)),
            ("embed_positions.weight", (self.max_positions + POSITION_OFFSET, h)),
        ]
        if self.projects:
            embed.append(("project_in.weight", (h, self.embed_dim)))
        layer = [
            *self._layer_norm("self_attn_layer_norm"),
            *self._layer_norm("final_layer_norm"),
            *linear_specs("self_attn.q_proj", h, h, self.bias),
            *linear_specs("self_attn.k_proj", h, h, self.bias),
            *linear_specs("self_attn.v_proj", h, h, self.bias),
            *linear_specs("self_attn.out_proj", h, h, self.bias),
            *linear_specs("fc1", f, h, self.bias),
            *linear_specs("fc2", h, f, self.bias),
        ]
        head = []
        if self.final_layer_norm:
            head += self._layer_norm("final_layer_norm")
        if self.projects:
            head.append(("project_out.weight", (self.embed_dim, h)))
        if not self.tied_head:
            head.append(("lm_head.weight", (self.vocab, self.embed_dim)))
        return [embed] + [list(layer) for _ in range(self.layers)] + [head]

    def _layer_norm(self, prefix: str) -> TensorList:
        if not self.layer_norm_affine:
            return []
        return [(f"{prefix}.weight", (self.hidden,)), (f"{prefix}.bias", (self.hidden,))]

    def checkpoint_name(self, stage: int, local: str) -> str:
        if stage == self.layers + 1 and local == "lm_head.weight":
            return "lm_head.weight"
        if 1 <= stage <= self.layers:
            return f"decoder.layers.{stage - 1}.{local}"
        return f"decoder.{local}"

    # -- math ----------------------------------------------------------------------------------

    def _ln(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        if self.layer_norm_affine:
            return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])
        return F.layer_norm(x, x.shape[-1:])

    def embed(
        self, w: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Token + learned position embeddings: (b, s) ids -> (b, s, h) hidden states."""
        x = lookup(w["embed_tokens.weight"], input_ids)  # (b, s, e)
        pos = lookup(w["embed_positions.weight"], position_ids + POSITION_OFFSET)  # (b, s, h)
        if self.projects:
            x = linear(x, w["project_in.weight"])
        return x + pos.to(x.dtype)

    def decoder_layer(
        self,
        w: Weights,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attend: Attend,
        *,
        layer: int = 0,
        span: int | None = None,
    ) -> torch.Tensor:
        """One OPT decoder layer on (b, s, h) hidden states (positions are in the embedding)."""
        b, s, _ = x.shape
        residual = x
        h = self._ln(x, w, "self_attn_layer_norm") if self.pre_layer_norm else x
        q = _lin(h, w, "self_attn.q_proj") * self.head_dim**-0.5
        k = _lin(h, w, "self_attn.k_proj")
        v = _lin(h, w, "self_attn.v_proj")
        split = (b, s, self.heads, self.head_dim)
        attn = attend(q.view(split), k.view(split), v.view(split))  # (b, s, H, d)
        x = residual + _lin(attn.reshape(b, s, self.hidden), w, "self_attn.out_proj")
        if not self.pre_layer_norm:
            x = self._ln(x, w, "self_attn_layer_norm")
        residual = x
        h = self._ln(x, w, "final_layer_norm") if self.pre_layer_norm else x
        h = _lin(_ACTIVATIONS[self.activation](_lin(h, w, "fc1")), w, "fc2")
        x = residual + h
        if not self.pre_layer_norm:
            x = self._ln(x, w, "final_layer_norm")
        return x

    def head(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """Final layer norm, projection and LM head: (b, s, h) -> (b, s, vocab) logits."""
        if self.final_layer_norm:
            x = self._ln(x, w, "final_layer_norm")
        if self.projects:
            x = linear(x, w["project_out.weight"])
        return project(x, w["lm_head.weight"])


def _lin(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))
