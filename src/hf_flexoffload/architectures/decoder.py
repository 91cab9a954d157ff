"""The rotary decoder every modern family is a variant of, written once.

A family (``llama.py``, ``qwen.py``, ``gemma.py``, ...) is a ``Decoder`` subclass that reads its
transformers config into the fields below and names its checkpoint's tensors (``Names``); the
math here picks the blocks those fields ask for:

* attention: separate q/k/v projections with a bias chosen per projection, or one fused
  projection (Phi-3's ``[q; k; v]`` rows, GPT-NeoX's per-head interleaved ``query_key_value``);
  q/k RMS norm per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2); grouped or
  multi-query heads; a scale other than ``head_dim ** -0.5`` (Gemma's ``query_pre_attn_scalar``);
  logit soft-capping (Gemma 2); a sliding window per layer (the KV cache unit applies it);
* positions: rotary embeddings of any supported type, per layer type, full or partial;
* norms (``norms.py``) in any of four places around attention and MLP: pre-norm (Llama),
  Gemma's four per layer, post-norm (OLMo 2), and GPT-NeoX's parallel residual;
* MLPs: gated (``act(gate) * up``), gated with a fused ``gate_up_proj`` (Phi-3), plain;
* embeddings scaled by ``sqrt(hidden)`` (Gemma), final-logit soft-capping, tied or untied heads.

Activations are transformers' own (``ACT2FN``), so ``gelu_pytorch_tanh`` or ``gelu_new`` are
exactly what stock models compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.activations import ACT2FN

from .base import Architecture, Attend, TensorList, Weights, linear_specs
from .layers import linear, lookup, project
from .norms import NORMS, norm
from .rope import Rope, apply_rotary

QKV_FORMS = ("separate", "concat", "interleaved")
MLP_FORMS = ("gated", "gated_fused", "plain")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Names:
    """Where a family's tensors are in its checkpoint (local names inside a layer are the
    checkpoint's own, after ``layers.N.``; a norm slot of ``None`` is absent)."""

    prefix: str = ""  # before embedding, layers and final norm ("gpt_neox." for GPT-NeoX)
    embed: str = "embed_tokens.weight"
    final_norm: str = "norm"
    lm_head: str = "lm_head.weight"
    pre_attn: str | None = "input_layernorm"
    post_attn: str | None = None
    pre_mlp: str | None = "post_attention_layernorm"
    post_mlp: str | None = None
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    qkv: str = "self_attn.qkv_proj"
    o: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    gate_up: str = "mlp.gate_up_proj"
    down: str = "mlp.down_proj"


@dataclass(frozen=True, kw_only=True)
class Decoder(Architecture):
    """A rotary decoder-only model: the fields say which blocks it uses (see the module doc)."""

    embeddings: ClassVar[frozenset[str]] = frozenset({"embed_tokens.weight", "lm_head.weight"})
    names: ClassVar[Names] = Names()
    # The family honours ``partial_rotary_factor`` (rotates only part of each head).
    partial_rotary: ClassVar[bool] = False

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    max_positions: int
    tied_head: bool = False
    norm: str = "rms"
    norm_eps: float = 1e-6
    parallel_residual: bool = False
    qkv: str = "separate"
    qkv_bias: tuple[bool, bool, bool] = (False, False, False)
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" or "projection"
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    mlp: str = "gated"
    mlp_bias: bool = False
    activation: str = "silu"
    ropes: tuple[Rope, ...]  # one per layer
    windows: tuple[int | None, ...] = ()  # per layer; () = no sliding window anywhere

    def __post_init__(self) -> None:
        what = type(self).model_type
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{what}: num_attention_heads={self.heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}: grouped-query attention needs it to be."
            )
        if self.activation not in ACT2FN:
            raise ValueError(f"{what}: activation {self.activation!r} is not a transformers one.")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("qkv", self.qkv, QKV_FORMS),
            ("mlp", self.mlp, MLP_FORMS),
            ("qk_norm", self.qk_norm, (None, "head", "projection")),
        ):
            if value not in allowed:
                raise ValueError(f"{what}: {name}={value!r} is not one of {list(allowed)}.")
        if len(self.ropes) != self.layers or (self.windows and len(self.windows) != self.layers):
            raise ValueError(f"{what}: ropes and windows need one entry per layer.")
        if any(w is not None and w < 1 for w in self.windows):
            raise ValueError(f"{what}: sliding windows must be positive, got {self.windows}.")

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.hidden

    @property
    def rope(self) -> Rope:
        """The first layer's rotary embedding (every layer's, unless layer types differ)."""
        return self.ropes[0]

    @property
    def kv_windows(self) -> tuple[int | None, ...]:
        return self.windows or (None,) * self.layers

    @property
    def needs_span(self) -> bool:
        return any(r.depends_on_length for r in set(self.ropes))

    @property
    def workspace_width(self) -> int:
        # q and the attention output (H·d), k and v (H_kv·d), residual and normed input, and
        # the MLP's intermediates (gate, up and their product).
        attn = 2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return attn + 2 * self.hidden + 3 * self.ffn

    # -- weights -------------------------------------------------------------------------------

    def stage_tensors(self) -> list[TensorList]:
        # The MLP's matrices come last in a layer: used last, they go to slower tiers.
        n, h, f, d = self.names, self.hidden, self.ffn, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        layer: TensorList = []
        for slot in (n.pre_attn, n.post_attn, n.pre_mlp, n.post_mlp):
            if slot is not None:
                layer += self._norm_specs(slot, h)
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            layer += self._norm_specs(n.q_norm, d if per_head else q)
            layer += self._norm_specs(n.k_norm, d if per_head else kv)
        if self.qkv == "separate":
            for name, rows, bias in zip((n.q, n.k, n.v), (q, kv, kv), self.qkv_bias, strict=True):
                layer += linear_specs(name, rows, h, bias)
        else:
            layer += linear_specs(n.qkv, q + 2 * kv, h, self.qkv_bias[0])
        layer += linear_specs(n.o, h, q, self.o_bias)
        if self.mlp == "gated":
            layer += linear_specs(n.gate, f, h, self.mlp_bias)
            layer += linear_specs(n.up, f, h, self.mlp_bias)
        elif self.mlp == "gated_fused":
            layer += linear_specs(n.gate_up, 2 * f, h, self.mlp_bias)
        else:
            layer += linear_specs(n.up, f, h, self.mlp_bias)
        layer += linear_specs(n.down, h, f, self.mlp_bias)
        head = self._norm_specs("norm", h)
        if not self.tied_head:
            head.append(("lm_head.weight", (self.vocab, h)))
        embed = [("embed_tokens.weight", (self.vocab, h))]
        return [embed] + [list(layer) for _ in range(self.layers)] + [head]

    def _norm_specs(self, prefix: str, width: int) -> TensorList:
        specs = [(f"{prefix}.weight", (width,))]
        if self.norm == "layer":
            specs.append((f"{prefix}.bias", (width,)))
        return specs

    def checkpoint_name(self, stage: int, local: str) -> str:
        n = self.names
        if local == "lm_head.weight":
            return n.lm_head
        if 1 <= stage <= self.layers:
            return f"{n.prefix}layers.{stage - 1}.{local}"
        if local == "embed_tokens.weight":
            return n.prefix + n.embed
        return n.prefix + local.replace("norm.", f"{n.final_norm}.", 1)

    # -- math ----------------------------------------------------------------------------------

    def _norm(self, w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
        return norm(self.norm, x, w[f"{name}.weight"], w.get(f"{name}.bias"), self.norm_eps)

    def embed(
        self, w: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings: (b, s) ids -> (b, s, h); positions enter in every layer's rotary."""
        x = lookup(w["embed_tokens.weight"], input_ids)
        if self.embed_scale is not None:
            # As Gemma's scaled embedding: the fp32 scale cast to the weights' dtype.
            x = x * torch.tensor(self.embed_scale, dtype=torch.float32).to(x.dtype)
        return x

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
        """One decoder layer (index ``layer``) on (b, s, h) hidden states at (b, s) positions."""
        n = self.names
        h = self._norm(w, n.pre_attn, x) if n.pre_attn else x
        attn = self._attention(w, h, position_ids, attend, self.ropes[layer], span)
        if self.parallel_residual:  # GPT-NeoX: both branches read the layer's input
            h = self._norm(w, n.pre_mlp, x) if n.pre_mlp else x
            return self._mlp(w, h) + attn + x
        if n.post_attn:
            attn = self._norm(w, n.post_attn, attn)
        x = x + attn
        h = self._norm(w, n.pre_mlp, x) if n.pre_mlp else x
        out = self._mlp(w, h)
        if n.post_mlp:
            out = self._norm(w, n.post_mlp, out)
        return x + out

    def _attention(
        self,
        w: Weights,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        attend: Attend,
        rope: Rope,
        span: int | None,
    ) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = self._qkv(w, h)  # (b, s, H or H_kv, d)
        if self.qk_norm == "head":
            q, k = self._norm(w, self.names.q_norm, q), self._norm(w, self.names.k_norm, k)
        cos, sin = rope.cos_sin(position_ids, h.dtype, span)  # (b, s, 1, r)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5
        capped = {} if self.attn_softcap is None else {"softcap": self.attn_softcap}
        out = attend(q, k, v, scale=scale, **capped)  # (b, s, H, d)
        return _lin(out.reshape(b, s, self.heads * self.head_dim), w, self.names.o)

    def _qkv(self, w: Weights, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, d = self.names, self.head_dim
        b, s, _ = h.shape
        q_rows, kv_rows = self.heads * d, self.kv_heads * d
        if self.qkv == "separate":
            q, k, v = _lin(h, w, n.q), _lin(h, w, n.k), _lin(h, w, n.v)
        elif self.qkv == "concat":  # Phi-3: rows [q; k; v]
            q, k, v = _lin(h, w, n.qkv).split((q_rows, kv_rows, kv_rows), dim=-1)
        else:  # GPT-NeoX: per head [q_i; k_i; v_i]
            per_head = _lin(h, w, n.qkv).view(b, s, self.heads, 3 * d)
            return per_head.chunk(3, dim=-1)
        if self.qk_norm == "projection":  # OLMo 2: over the whole projection
            q, k = self._norm(w, n.q_norm, q), self._norm(w, n.k_norm, k)
        return (
            q.view(b, s, self.heads, d),
            k.view(b, s, self.kv_heads, d),
            v.view(b, s, self.kv_heads, d),
        )

    def _mlp(self, w: Weights, h: torch.Tensor) -> torch.Tensor:
        n, act = self.names, ACT2FN[self.activation]
        if self.mlp == "gated":
            inner = act(_lin(h, w, n.gate)) * _lin(h, w, n.up)
        elif self.mlp == "gated_fused":  # Phi-3: gate rows first, then up
            gate, up = _lin(h, w, n.gate_up).chunk(2, dim=-1)
            inner = up * act(gate)
        else:
            inner = act(_lin(h, w, n.up))
        return _lin(inner, w, n.down)

    def head(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and soft-capping: (b, s, h) -> (b, s, vocab) logits."""
        logits = project(self._norm(w, "norm", x), w["lm_head.weight"])
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def _lin(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def layer_types(config) -> tuple[str, ...]:
    """Each layer's type: the config's ``layer_types``, else sliding everywhere when the config
    has a ``sliding_window`` (Mistral, Phi-3), else full attention."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != config.num_hidden_layers:
        raise ValueError(
            f"config.layer_types={list(types)} is not supported: hf_flexoffload runs one of "
            f"{list(LAYER_TYPES)} per layer, one entry per layer."
        )
    return tuple(types)


def common_fields(config, *, partial_rotary: bool = False, per_type_rope: bool = False) -> dict:
    """The fields every family reads the same way from its config: sizes, the tied head, the
    rotary embedding of each layer and the sliding window of each sliding layer. Refuses what
    none of the families runs (bidirectional attention, tensor-parallel pretraining splits)."""
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{config.model_type}: use_bidirectional_attention=True is not causal attention; "
            "hf_flexoffload generates with causal decoders only."
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(
            f"pretraining_tp={config.pretraining_tp} is not supported (transformers ignores it "
            "too); set it to 1."
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = layer_types(config)
    ropes = {
        t: Rope.from_config(config, head_dim, t if per_type_rope else None, partial_rotary)
        for t in set(types)
    }
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return dict(
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn=config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        tied_head=bool(getattr(config, "tie_word_embeddings", False)),
        ropes=tuple(ropes[t] for t in types),
        windows=windows if window is not None and any(windows) else (),
    )
