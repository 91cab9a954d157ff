"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Supported architectures (``config.model_type``): "opt", "llama", "qwen2", "qwen3", "mistral",
"gemma2", "gemma3_text", "phi3", "olmo2" and "gpt_neox".

Example:
    >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
    ...     "path/to/model", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from .config.policy import Policy, QuantConfig, Split, Workload
from .modeling.auto import AutoFlexOffloadModelForCausalLM
from .modeling.causal_lm import FlexOffloadLlamaForCausalLM, FlexOffloadOPTForCausalLM
from .modeling.families import (
    FlexOffloadGemma2ForCausalLM,
    FlexOffloadGemma3ForCausalLM,
    FlexOffloadGPTNeoXForCausalLM,
    FlexOffloadMistralForCausalLM,
    FlexOffloadOlmo2ForCausalLM,
    FlexOffloadPhi3ForCausalLM,
    FlexOffloadQwen2ForCausalLM,
    FlexOffloadQwen3ForCausalLM,
)
from .planning.budget import InsufficientMemoryError
from .planning.cost_model import Estimate
from .planning.hardware import HardwareProfile
from .planning.optimizer import InfeasiblePolicyError
from .runtime.stats import GenerationStats
from .storage.offload_cache import FlexOffloadCache
from .storage.placement import PlacementReport

__all__ = [
    "AutoFlexOffloadModelForCausalLM",
    "Estimate",
    "FlexOffloadCache",
    "FlexOffloadGPTNeoXForCausalLM",
    "FlexOffloadGemma2ForCausalLM",
    "FlexOffloadGemma3ForCausalLM",
    "FlexOffloadLlamaForCausalLM",
    "FlexOffloadMistralForCausalLM",
    "FlexOffloadOPTForCausalLM",
    "FlexOffloadOlmo2ForCausalLM",
    "FlexOffloadPhi3ForCausalLM",
    "FlexOffloadQwen2ForCausalLM",
    "FlexOffloadQwen3ForCausalLM",
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
