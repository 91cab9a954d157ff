"""``AutoFlexOffloadModelForCausalLM``: the offloaded model class for a checkpoint's model type."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any

from transformers import AutoConfig

from ..architectures import ARCHITECTURES, check_supported
from ..checkpoints.hub import resolve_pretrained
from .causal_lm import (
    HUB_KWARGS,
    FlexOffloadCausalLMMixin,
    FlexOffloadLlamaForCausalLM,
    FlexOffloadOPTForCausalLM,
)
from .families import FAMILY_CLASSES

MODEL_CLASSES: MappingProxyType[str, type[FlexOffloadCausalLMMixin]] = MappingProxyType(
    {
        cls.supported_model_type: cls
        for cls in (FlexOffloadOPTForCausalLM, FlexOffloadLlamaForCausalLM, *FAMILY_CLASSES)
    }
)
assert set(MODEL_CLASSES) == set(ARCHITECTURES), "every architecture needs its model class"


class AutoFlexOffloadModelForCausalLM:
    """Loads a checkpoint with the offloaded class of its ``config.model_type``.

    Example:
        >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split
        >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
        ...     "path/to/smollm2", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
        >>> type(model).__name__
        'FlexOffloadLlamaForCausalLM'
    """

    def __init__(self) -> None:
        raise OSError(
            "AutoFlexOffloadModelForCausalLM is not instantiated: use "
            "AutoFlexOffloadModelForCausalLM.from_pretrained(path, ...)."
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> FlexOffloadCausalLMMixin:
        """Read the checkpoint's config and load it with the matching class.

        Args:
            pretrained_model_name_or_path: A Hugging Face Hub repo id or a local checkpoint
                directory (see ``FlexOffloadOPTForCausalLM.from_pretrained``).
            kwargs: Passed on to the class's ``from_pretrained`` (``offload_policy``,
                ``offload_dir``, ``device``, ``dtype``, ``max_memory``, ``workload``, the hub
                arguments ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ...).

        Returns:
            The model class of ``config.model_type`` (``MODEL_CLASSES``), e.g.
            ``FlexOffloadLlamaForCausalLM`` or ``FlexOffloadQwen2ForCausalLM``.

        Raises:
            ValueError: The model type is not supported (checked before any weight is read).
        """
        path = resolve_pretrained(
            pretrained_model_name_or_path,
            use_safetensors=kwargs.get("use_safetensors"),
            **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs},
        )
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
        check_supported(config.model_type, repr(path))
        return MODEL_CLASSES[config.model_type].from_pretrained(path, config=config, **kwargs)
