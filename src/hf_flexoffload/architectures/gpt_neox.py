"""GPT-NeoX (Pythia, and models built on it): LayerNorm, parallel residual, fused attention.

The attention's ``query_key_value`` holds each head's q, k and v rows together
(``[q_0; k_0; v_0; q_1; ...]``); the rotary embedding covers the first ``rotary_pct`` of each
head (``rope_parameters["partial_rotary_factor"]``); with ``use_parallel_residual`` the
attention and the MLP both read the layer's input, and their outputs are added to it together;
the MLP is plain (``dense_h_to_4h``, activation, ``dense_4h_to_h``, with biases); the head
(``embed_out``) is untied. The checkpoint's tensors live under ``gpt_neox.``; transformers 5.24
saves the head as ``lm_head`` (and reads the hub's ``embed_out``): both are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .decoder import Decoder, Names, common_fields


@dataclass(frozen=True, kw_only=True)
class GPTNeoXShape(Decoder):
    """The parts of a ``GPTNeoXConfig`` the math needs."""

    model_type: ClassVar[str] = "gpt_neox"
    partial_rotary: ClassVar[bool] = True
    names: ClassVar[Names] = Names(
        prefix="gpt_neox.",
        embed="embed_in.weight",
        final_norm="final_layer_norm",
        lm_head="embed_out.weight",
        qkv="attention.query_key_value",
        o="attention.dense",
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
    )

    def renamed_tensors(self) -> dict[str, str]:
        return {"lm_head.weight": "embed_out.weight"}

    @classmethod
    def from_config(cls, config) -> GPTNeoXShape:
        bias = bool(getattr(config, "attention_bias", True))
        return cls(
            **common_fields(config, partial_rotary=cls.partial_rotary),
            norm="layer",
            norm_eps=config.layer_norm_eps,
            parallel_residual=bool(config.use_parallel_residual),
            qkv="interleaved",
            qkv_bias=(bias, bias, bias),
            o_bias=bias,
            mlp="plain",
            mlp_bias=True,
            activation=config.hidden_act,
        )
