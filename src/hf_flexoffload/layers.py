"""OPT as pure functions: which weights each stage has, and the math of each stage.

A model is a list of *stages*, each with its own weights: stage 0 embeds tokens and positions,
stages 1..L are the decoder layers, stage L + 1 is the output head. Functions take the stage's
weights as a dict of plain tensors keyed by local name (``"fc1.weight"``) and never know where
the weights came from. The math follows transformers' ``modeling_opt`` step by step (q is scaled
before the matmul, positions are offset by 2) so results match stock OPT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compression import QuantizedTensor, linear, take_rows

# Embedding and head matrices may stay quantized (see EMBEDDINGS); everything else is plain.
Weights = dict[str, torch.Tensor | QuantizedTensor]
# attend(q, k_new, v_new) -> attention output (b, s, H, d); supplied by the KV cache unit.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (a fairseq legacy)


@dataclass(frozen=True)
class OPTShape:
    """The parts of an ``OPTConfig`` the math needs."""

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
    def projects(self) -> bool:
        return self.embed_dim != self.hidden

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


# -- weight names ----------------------------------------------------------------------------


def _linear(prefix: str, out_f: int, in_f: int, bias: bool) -> list[tuple[str, tuple]]:
    specs = [(f"{prefix}.weight", (out_f, in_f))]
    if bias:
        specs.append((f"{prefix}.bias", (out_f,)))
    return specs


def _layer_norm(prefix: str, dim: int, affine: bool) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))] if affine else []


def stage_tensors(shape: OPTShape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Local (name, shape) of every stored tensor, per stage.

    The order within a stage is the order the placement cuts through: the large matrices used
    last (fc1/fc2) come last so they are the ones that go to the slower tiers.
    """
    h, f = shape.hidden, shape.ffn
    embed = [
        ("embed_tokens.weight", (shape.vocab, shape.embed_dim)),
        ("embed_positions.weight", (shape.max_positions + POSITION_OFFSET, h)),
    ]
    if shape.projects:
        embed.append(("project_in.weight", (h, shape.embed_dim)))
    layer = [
        *_layer_norm("self_attn_layer_norm", h, shape.layer_norm_affine),
        *_layer_norm("final_layer_norm", h, shape.layer_norm_affine),
        *_linear("self_attn.q_proj", h, h, shape.bias),
        *_linear("self_attn.k_proj", h, h, shape.bias),
        *_linear("self_attn.v_proj", h, h, shape.bias),
        *_linear("self_attn.out_proj", h, h, shape.bias),
        *_linear("fc1", f, h, shape.bias),
        *_linear("fc2", h, f, shape.bias),
    ]
    head = []
    if shape.final_layer_norm:
        head += _layer_norm("final_layer_norm", h, shape.layer_norm_affine)
    if shape.projects:
        head.append(("project_out.weight", (shape.embed_dim, h)))
    if not shape.tied_head:
        head.append(("lm_head.weight", (shape.vocab, shape.embed_dim)))
    return [embed] + [list(layer) for _ in range(shape.layers)] + [head]


def stage_prefix(stage: int, shape: OPTShape) -> str:
    """Checkpoint-name prefix of a stage's tensors (``model.`` stripped)."""
    if stage == 0:
        return "decoder."
    if stage <= shape.layers:
        return f"decoder.layers.{stage - 1}."
    return "decoder."


# Weights that map tokens rather than transform hidden states; Policy.compress_embeddings decides
# whether they are quantized. When they are, the math receives them quantized: a lookup
# dequantizes only the rows it reads, and the head dequantizes its matrix a chunk at a time.
EMBEDDINGS = frozenset({"embed_tokens.weight", "embed_positions.weight", "lm_head.weight"})


def head_aliases(shape: OPTShape) -> dict[str, tuple[int, str]]:
    """Head weights stored in another stage: local name -> (stage, local name there)."""
    return {"lm_head.weight": (0, "embed_tokens.weight")} if shape.tied_head else {}


def checkpoint_name(stage: int, local: str, shape: OPTShape) -> str:
    if stage == shape.layers + 1 and local == "lm_head.weight":
        return "lm_head.weight"
    return stage_prefix(stage, shape) + local


# -- math ------------------------------------------------------------------------------------


def _ln(x: torch.Tensor, w: Weights, name: str, affine: bool) -> torch.Tensor:
    if affine:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])
    return F.layer_norm(x, x.shape[-1:])


def _lin(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def embed(
    shape: OPTShape, w: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Token + learned position embeddings: (b, s) ids -> (b, s, h) hidden states."""
    x = _lookup(w["embed_tokens.weight"], input_ids)  # (b, s, e)
    pos = _lookup(w["embed_positions.weight"], position_ids + POSITION_OFFSET)  # (b, s, h)
    if shape.projects:
        x = F.linear(x, w["project_in.weight"])
    return x + pos.to(x.dtype)


def decoder_layer(shape: OPTShape, w: Weights, x: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One OPT decoder layer on (b, s, h) hidden states; ``attend`` owns the KV cache."""
    b, s, _ = x.shape
    residual = x
    h = _ln(x, w, "self_attn_layer_norm", shape.layer_norm_affine) if shape.pre_layer_norm else x
    q = _lin(h, w, "self_attn.q_proj") * shape.head_dim**-0.5
    k = _lin(h, w, "self_attn.k_proj")
    v = _lin(h, w, "self_attn.v_proj")
    split = (b, s, shape.heads, shape.head_dim)
    attn = attend(q.view(split), k.view(split), v.view(split))  # (b, s, H, d)
    x = residual + _lin(attn.reshape(b, s, shape.hidden), w, "self_attn.out_proj")
    if not shape.pre_layer_norm:
        x = _ln(x, w, "self_attn_layer_norm", shape.layer_norm_affine)
    residual = x
    h = _ln(x, w, "final_layer_norm", shape.layer_norm_affine) if shape.pre_layer_norm else x
    h = _lin(_ACTIVATIONS[shape.activation](_lin(h, w, "fc1")), w, "fc2")
    x = residual + h
    if not shape.pre_layer_norm:
        x = _ln(x, w, "final_layer_norm", shape.layer_norm_affine)
    return x


def head(shape: OPTShape, w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Final layer norm, projection and LM head: (b, s, h) -> (b, s, vocab) logits."""
    if shape.final_layer_norm:
        x = _ln(x, w, "final_layer_norm", shape.layer_norm_affine)
    if shape.projects:
        x = F.linear(x, w["project_out.weight"])
    weight = w["lm_head.weight"]
    if isinstance(weight, QuantizedTensor):
        return linear(x, weight)
    return F.linear(x, weight)


def _lookup(weight: torch.Tensor | QuantizedTensor, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, QuantizedTensor):
        return take_rows(weight, ids)
    return F.embedding(ids, weight)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention of new queries over all keys, with padding.

    Args:
        q: (b, H, s, d) queries for the last ``s`` positions, already scaled.
        k: (b, H, S, d) keys of all ``S`` positions (cached ones first).
        v: (b, H, S, d) values.
        key_mask: (b, S) 1 for real tokens, 0 for padding; ``None`` = all real.

    Returns:
        (b, s, H, d) attention output.
    """
    s, total = q.shape[-2], k.shape[-2]
    dtype = q.dtype
    # Masked scores get finfo.min, not -inf: a row that sees only padding stays finite (a NaN
    # there would leak into real rows through the cache).
    allowed = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)  # (s, S)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (b, H, s, d)
    return out.transpose(1, 2)
