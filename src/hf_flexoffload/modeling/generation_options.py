"""Which ``generate`` options an offloaded model supports, checked before any heavy work.

transformers' own ``generate`` drives the token loop, so everything around greedy and sampling
decoding works unchanged. What needs another loop (beam search, assisted decoding) or another
cache (``cache_implementation``, a cache of the caller's) is refused with a ``ValueError`` naming
the option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import GenerationConfig

from .cache_keyword import CACHE_NAMES

# (generation-config field, value that is fine, what to say)
UNSUPPORTED_GENERATION = (
    ("num_beams", 1, "beam search (num_beams > 1)"),
    ("num_beam_groups", 1, "group beam search (num_beam_groups > 1)"),
    ("penalty_alpha", None, "contrastive search (penalty_alpha)"),
    ("assistant_model", None, "assisted decoding (assistant_model)"),
    ("prompt_lookup_num_tokens", None, "prompt lookup decoding (prompt_lookup_num_tokens)"),
    ("assistant_early_exit", None, "self-speculative decoding (assistant_early_exit)"),
    ("dola_layers", None, "DoLa decoding (dola_layers)"),
    ("cache_implementation", None, "cache_implementation (the offloaded KV cache is managed)"),
    ("output_attentions", False, "output_attentions"),
    ("output_hidden_states", False, "output_hidden_states"),
    ("use_cache", True, "use_cache=False (offloaded generation needs its KV cache)"),
)


def check_generate_options(
    config: GenerationConfig, model_kwargs: Mapping[str, Any], kwargs: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` for a ``generate`` option offloaded models do not support.

    Args:
        config: The effective generation config (the model's, updated with ``kwargs``).
        model_kwargs: What ``GenerationConfig.update`` left over (the model's own inputs).
        kwargs: Everything the caller passed to ``generate``.
    """
    for name, fine, what in UNSUPPORTED_GENERATION:
        value = model_kwargs.get(name, getattr(config, name, fine))
        if value is not None and value != fine:
            raise ValueError(f"{what} is not supported by offloaded models.")
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"generate(..., {name}=...) is not supported by offloaded models: the model "
                "plans and manages its own KV cache for each call (its tiers, micro-batches and "
                "length). Generate again with the full prompt instead of passing a cache."
            )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "generate(..., inputs_embeds=...) is not supported by offloaded models: pass "
            "input_ids (the prompt tokens)."
        )
