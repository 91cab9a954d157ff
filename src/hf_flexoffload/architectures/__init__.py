"""The architectures hf_flexoffload runs, keyed by ``config.model_type``.

Every family but OPT is a variant of one rotary decoder (``decoder.py``): its module reads the
config into the decoder's fields (which norm, which attention and MLP form, biases, windows,
rotary type) and names the checkpoint's tensors; adding one is such a module, its entry in
``ARCHITECTURES`` and its model class in ``modeling/families.py``. The schedule, placement,
storage, KV cache, compression and cost model need no change. The math they share is in
``layers.py`` (positions from the mask, attention with windows and soft-capping, lookups and
projections of quantized or streamed matrices), ``norms.py`` and ``rope.py``.
"""

from __future__ import annotations

from types import MappingProxyType

from .base import Architecture, Attend, TensorList, Weights
from .decoder import Decoder, Names
from .gemma import Gemma2Shape, Gemma3TextShape
from .gpt_neox import GPTNeoXShape
from .llama import LlamaShape, MistralShape
from .moe import MoeDecoder, MoeNames
from .moe_families import MixtralShape, OlmoeShape, Qwen2MoeShape, Qwen3MoeShape
from .olmo2 import Olmo2Shape
from .opt import OPTShape
from .phi3 import Phi3Shape
from .qwen import Qwen2Shape, Qwen3Shape
from .rope import Rope

ARCHITECTURES: MappingProxyType[str, type[Architecture]] = MappingProxyType(
    {
        cls.model_type: cls
        for cls in (
            OPTShape,
            LlamaShape,
            Qwen2Shape,
            Qwen3Shape,
            MistralShape,
            Gemma2Shape,
            Gemma3TextShape,
            Phi3Shape,
            Olmo2Shape,
            GPTNeoXShape,
            MixtralShape,
            Qwen2MoeShape,
            Qwen3MoeShape,
            OlmoeShape,
        )
    }
)


def check_supported(model_type: str, what: str = "This checkpoint") -> None:
    """Raise a ValueError naming ``model_type`` and the supported ones unless it is supported."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{what} is a {model_type!r} model, which hf_flexoffload does not support; "
            f"supported model types: {', '.join(repr(t) for t in ARCHITECTURES)}."
        )


def architecture_for(config) -> Architecture:
    """The architecture of a transformers config.

    Example:
        >>> from transformers import LlamaConfig
        >>> architecture_for(LlamaConfig(num_key_value_heads=8)).kv_heads
        8
    """
    model_type = getattr(config, "model_type", None)
    check_supported(model_type, f"The config ({type(config).__name__})")
    return ARCHITECTURES[model_type].from_config(config)


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Attend",
    "Decoder",
    "GPTNeoXShape",
    "Gemma2Shape",
    "Gemma3TextShape",
    "LlamaShape",
    "MistralShape",
    "MixtralShape",
    "MoeDecoder",
    "MoeNames",
    "Names",
    "OPTShape",
    "Olmo2Shape",
    "OlmoeShape",
    "Phi3Shape",
    "Qwen2MoeShape",
    "Qwen2Shape",
    "Qwen3MoeShape",
    "Qwen3Shape",
    "Rope",
    "TensorList",
    "Weights",
    "architecture_for",
    "check_supported",
]
