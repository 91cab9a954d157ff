"""The name under which transformers passes the KV cache, detected from the installed release.

transformers 5.24 renamed the cache keyword from ``past_key_values`` to ``cache`` throughout
generation: ``generate(cache=...)``, the ``cache`` argument ``prepare_inputs_for_generation`` sends
to ``forward``, ``outputs["cache"]`` read back after every step, and the ``cache`` field of
``CausalLMOutputWithPast`` and the ``Generate*Output`` classes. The old names still work there, but
warn. Earlier 5.x releases know only ``past_key_values``.

The name is read from a public class (the fields of ``CausalLMOutputWithPast``), never from a
version number, so a release that renames it again fails one contract test, not every golden test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast


def detect_cache_keyword() -> str:
    """``"cache"`` where transformers' outputs carry the KV cache under that field (5.24 on),
    else ``"past_key_values"``."""
    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    for name in ("cache", "past_key_values"):
        if name in fields:
            return name
    raise RuntimeError(
        "This transformers release has neither a 'cache' nor a 'past_key_values' field in "
        f"CausalLMOutputWithPast (fields: {sorted(fields)}); hf_flexoffload does not support it "
        "yet: install a transformers release within the range hf_flexoffload declares (its "
        "README lists the supported releases)."
    )


#: The keyword ``generate`` and ``forward`` use for the cache, and the output field holding it.
CACHE_KEYWORD: str = detect_cache_keyword()

#: Every name a caller may use for a cache: ``cache`` (5.24 on), ``past_key_values`` (our own
#: accepted alias, and transformers' before 5.24), ``cache_params`` (state-space models').
CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values", "cache_params")


def cache_from_output(output: Any) -> Any:
    """The KV cache a model output or a ``generate`` output carries, under whichever name this
    transformers gives it (None when it carries none).

    Args:
        output: A ``ModelOutput`` (``CausalLMOutputWithPast``, ``GenerateDecoderOnlyOutput``, ...).
    """
    return getattr(output, CACHE_KEYWORD, None)


def cache_argument(cache: Any, past_key_values: Any) -> Any:
    """The cache ``forward`` was given, under either name; both at once is an error.

    Args:
        cache: ``forward``'s ``cache`` argument (the name transformers 5.24 on passes).
        past_key_values: ``forward``'s ``past_key_values`` argument (earlier releases', and ours).
    """
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Pass the KV cache once: got both cache= and past_key_values= (they are two names "
            "for the same argument)."
        )
    return cache if cache is not None else past_key_values


def output_with_cache(**fields: Any) -> CausalLMOutputWithPast:
    """A ``CausalLMOutputWithPast`` with the cache (given as ``cache=``) under the field this
    transformers reads back between generation steps."""
    cache = fields.pop("cache", None)
    return CausalLMOutputWithPast(**fields, **{CACHE_KEYWORD: cache})
