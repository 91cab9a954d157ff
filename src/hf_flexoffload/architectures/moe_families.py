"""The mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Each is its dense relative (Mistral, Qwen2, Qwen3, OLMo-style attention) with a sparse MLP
(``moe.py``); they differ in how they route and where the sparse layers are:

* Mixtral: every layer sparse, top-k weights always renormalized and kept in fp32; the
  checkpoint names its experts' matrices ``block_sparse_moe.experts.E.w1/w3/w2``.
* Qwen2-MoE: a shared expert with a sigmoid gate beside the routed ones; ``norm_topk_prob``;
  dense layers where ``mlp_only_layers`` lists them or ``decoder_sparse_step`` skips them
  (their MLP has ``intermediate_size``, the experts ``moe_intermediate_size``).
* Qwen3-MoE: Qwen3's per-head q/k norms, Qwen2-MoE's layer selection, no shared expert.
* OLMoE: q/k RMS norms over the whole projection, optional ``clip_qkv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .decoder import common_fields
from .moe import MoeDecoder, MoeNames


def _moe_fields(config, *, experts: int, expert_ffn: int, bias: bool) -> dict:
    """What every MoE family reads the same way: the rotary decoder's fields, attention biases,
    the router's sizes and ``norm_topk_prob``."""
    return dict(
        **common_fields(config),
        norm_eps=config.rms_norm_eps,
        qkv_bias=(bias, bias, bias),
        activation=config.hidden_act,
        experts=experts,
        top_k=config.num_experts_per_tok,
        expert_ffn=expert_ffn,
        norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)),
    )


def _sparse_layers(config) -> tuple[bool, ...]:
    """Qwen-MoE's choice of sparse layers (``mlp_only_layers``, ``decoder_sparse_step``)."""
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return tuple(
        i not in dense and config.num_experts > 0 and (i + 1) % step == 0
        for i in range(config.num_hidden_layers)
    )


@dataclass(frozen=True, kw_only=True)
class MixtralShape(MoeDecoder):
    """The parts of a ``MixtralConfig`` the math needs."""

    model_type: ClassVar[str] = "mixtral"
    moe_names: ClassVar[MoeNames] = MoeNames(
        block="block_sparse_moe", gate="w1", up="w3", down="w2"
    )

    @classmethod
    def from_config(cls, config) -> MixtralShape:
        fields = _moe_fields(
            config,
            experts=config.num_local_experts,
            expert_ffn=config.intermediate_size,
            bias=False,
        )
        return cls(**{**fields, "norm_topk_prob": True}, weights_in_model_dtype=False)


@dataclass(frozen=True, kw_only=True)
class Qwen2MoeShape(MoeDecoder):
    """The parts of a ``Qwen2MoeConfig`` the math needs."""

    model_type: ClassVar[str] = "qwen2_moe"

    @classmethod
    def from_config(cls, config) -> Qwen2MoeShape:
        return cls(
            **_moe_fields(
                config,
                experts=config.num_experts,
                expert_ffn=config.moe_intermediate_size,
                bias=bool(getattr(config, "qkv_bias", True)),
            ),
            shared_ffn=config.shared_expert_intermediate_size,
            sparse=_sparse_layers(config),
        )


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeShape(MoeDecoder):
    """The parts of a ``Qwen3MoeConfig`` the math needs."""

    model_type: ClassVar[str] = "qwen3_moe"

    @classmethod
    def from_config(cls, config) -> Qwen3MoeShape:
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            **_moe_fields(
                config,
                experts=config.num_experts,
                expert_ffn=config.moe_intermediate_size,
                bias=bias,
            ),
            o_bias=bias,
            qk_norm="head",
            sparse=_sparse_layers(config),
        )


@dataclass(frozen=True, kw_only=True)
class OlmoeShape(MoeDecoder):
    """The parts of an ``OlmoeConfig`` the math needs."""

    model_type: ClassVar[str] = "olmoe"

    @classmethod
    def from_config(cls, config) -> OlmoeShape:
        bias = bool(getattr(config, "attention_bias", False))
        return cls(
            **_moe_fields(
                config, experts=config.num_experts, expert_ffn=config.intermediate_size, bias=bias
            ),
            o_bias=bias,
            qk_norm="projection",
            clip_qkv=getattr(config, "clip_qkv", None),
        )
