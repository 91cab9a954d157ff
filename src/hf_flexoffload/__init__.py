"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Supported architectures (``config.model_type``): "opt", "llama", "qwen2", "qwen3", "mistral",
"gemma2", "gemma3_text", "phi3", "olmo2" and "gpt_neox".

Example:
    >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
    ...     "path/to/model", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module defining it, imported on first use: ``import hf_flexoffload`` (and
# ``hf-flexoffload --help``) stays fast, torch and transformers load only when needed.
_LAZY = {
    "Policy": ".config.policy",
    "QuantConfig": ".config.policy",
    "Split": ".config.policy",
    "Workload": ".config.workload",
    "AutoFlexOffloadModelForCausalLM": ".modeling.auto",
    "FlexOffloadLlamaForCausalLM": ".modeling.causal_lm",
    "FlexOffloadOPTForCausalLM": ".modeling.causal_lm",
    "FlexOffloadGemma2ForCausalLM": ".modeling.families",
    "FlexOffloadGemma3ForCausalLM": ".modeling.families",
    "FlexOffloadGPTNeoXForCausalLM": ".modeling.families",
    "FlexOffloadMistralForCausalLM": ".modeling.families",
    "FlexOffloadMixtralForCausalLM": ".modeling.families",
    "FlexOffloadOlmoeForCausalLM": ".modeling.families",
    "FlexOffloadQwen2MoeForCausalLM": ".modeling.families",
    "FlexOffloadQwen3MoeForCausalLM": ".modeling.families",
    "FlexOffloadOlmo2ForCausalLM": ".modeling.families",
    "FlexOffloadPhi3ForCausalLM": ".modeling.families",
    "FlexOffloadQwen2ForCausalLM": ".modeling.families",
    "FlexOffloadQwen3ForCausalLM": ".modeling.families",
    "InsufficientMemoryError": ".planning.budget",
    "Estimate": ".planning.cost_model",
    "ExpertUsage": ".config.expert_usage",
    "HardwareProfile": ".planning.hardware",
    "InfeasiblePolicyError": ".planning.optimizer",
    "GenerationStats": ".runtime.stats",
    "FlexOffloadCache": ".storage.offload_cache",
    "PlacementReport": ".storage.placement",
}

if TYPE_CHECKING:
    from .config.expert_usage import ExpertUsage
    from .config.policy import Policy, QuantConfig, Split
    from .config.workload import Workload
    from .modeling.auto import AutoFlexOffloadModelForCausalLM
    from .modeling.causal_lm import FlexOffloadLlamaForCausalLM, FlexOffloadOPTForCausalLM
    from .modeling.families import (
        FlexOffloadGemma2ForCausalLM,
        FlexOffloadGemma3ForCausalLM,
        FlexOffloadGPTNeoXForCausalLM,
        FlexOffloadMistralForCausalLM,
        FlexOffloadMixtralForCausalLM,
        FlexOffloadOlmo2ForCausalLM,
        FlexOffloadOlmoeForCausalLM,
        FlexOffloadPhi3ForCausalLM,
        FlexOffloadQwen2ForCausalLM,
        FlexOffloadQwen2MoeForCausalLM,
        FlexOffloadQwen3ForCausalLM,
        FlexOffloadQwen3MoeForCausalLM,
    )
    from .planning.budget import InsufficientMemoryError
    from .planning.cost_model import Estimate
    from .planning.hardware import HardwareProfile
    from .planning.optimizer import InfeasiblePolicyError
    from .runtime.stats import GenerationStats
    from .storage.offload_cache import FlexOffloadCache
    from .storage.placement import PlacementReport


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_flexoffload' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AutoFlexOffloadModelForCausalLM",
    "Estimate",
    "ExpertUsage",
    "FlexOffloadCache",
    "FlexOffloadGPTNeoXForCausalLM",
    "FlexOffloadGemma2ForCausalLM",
    "FlexOffloadGemma3ForCausalLM",
    "FlexOffloadLlamaForCausalLM",
    "FlexOffloadMistralForCausalLM",
    "FlexOffloadMixtralForCausalLM",
    "FlexOffloadOPTForCausalLM",
    "FlexOffloadOlmo2ForCausalLM",
    "FlexOffloadOlmoeForCausalLM",
    "FlexOffloadPhi3ForCausalLM",
    "FlexOffloadQwen2ForCausalLM",
    "FlexOffloadQwen2MoeForCausalLM",
    "FlexOffloadQwen3ForCausalLM",
    "FlexOffloadQwen3MoeForCausalLM",
    "GenerationStats",
    "HardwareProfile",
    "InfeasiblePolicyError",
    "InsufficientMemoryError",
    "PlacementReport",
    "Policy",
    "QuantConfig",
    "Split",
    "Workload",
]
__version__ = "0.1.0"
