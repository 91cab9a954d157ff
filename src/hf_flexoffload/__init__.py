"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Example:
    >>> from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
    >>> model = FlexOffloadOPTForCausalLM.from_pretrained(
    ...     "path/to/opt", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from .budget import InsufficientMemoryError
from .cost_model import Estimate
from .hardware import HardwareProfile
from .kv_cache import FlexOffloadCache
from .modeling import FlexOffloadOPTForCausalLM
from .optimizer import InfeasiblePolicyError
from .placement import PlacementReport
from .policy import Policy, QuantConfig, Split, Workload
from .stats import GenerationStats

__all__ = [
    "Estimate",
    "FlexOffloadCache",
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
