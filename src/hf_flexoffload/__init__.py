"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Supported architectures: OPT and Llama (``config.model_type`` "opt" and "llama").

Example:
    >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
    ...     "path/to/model", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from .config.policy import Policy, QuantConfig, Split, Workload
from .modeling.auto import AutoFlexOffloadModelForCausalLM
from .modeling.causal_lm import FlexOffloadLlamaForCausalLM, FlexOffloadOPTForCausalLM
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
    "FlexOffloadLlamaForCausalLM",
    "FlexOffloadOPTForCausalLM",
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
