"""The architectures hf_flexoffload runs, keyed by ``config.model_type``.

Adding one is a module here with an ``Architecture`` subclass (sizes, weight names, stage math;
see ``base.py``) and an entry in ``ARCHITECTURES``; the schedule, placement, storage, KV cache,
compression and cost model need no change. The math they share is in ``layers.py`` (positions
from the mask, attention, RMS norm, lookups and projections of quantized or streamed matrices).
"""

from __future__ import annotations

from types import MappingProxyType

from .base import Architecture, Attend, TensorList, Weights
from .llama import LlamaShape
from .opt import OPTShape
from .rope import Rope

ARCHITECTURES: MappingProxyType[str, type[Architecture]] = MappingProxyType(
    {cls.model_type: cls for cls in (OPTShape, LlamaShape)}
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
    "LlamaShape",
    "OPTShape",
    "Rope",
    "TensorList",
    "Weights",
    "architecture_for",
    "check_supported",
]
