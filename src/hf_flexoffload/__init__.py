"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Supported architectures: OPT and Llama (``config.model_type`` "opt" and "llama").

Example:
    >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
    ...     "path/to/model", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from .auto import AutoFlexOffloadModelForCausalLM
from .budget import InsufficientMemoryError
from .cost_model import Estimate
from .hardware import HardwareProfile
from .modeling import FlexOffloadLlamaForCausalLM, FlexOffloadOPTForCausalLM
from .offload_cache import FlexOffloadCache
from .optimizer import InfeasiblePolicyError
from .placement import PlacementReport
from .policy import Policy, QuantConfig, Split, Workload
from .stats import GenerationStats

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
