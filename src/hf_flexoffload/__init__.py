"""hf_flexoffload: FlexGen-style high-throughput offloaded inference for transformers.

Example:
    >>> from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
    >>> model = FlexOffloadOPTForCausalLM.from_pretrained(
    ...     "path/to/opt", offload_policy=Policy(weights=Split(host=0.5, disk=0.5)))
"""

from .budget import InsufficientMemoryError
from .kv_cache import FlexOffloadCache
from .modeling import FlexOffloadOPTForCausalLM
from .placement import PlacementReport
from .policy import Policy, QuantConfig, Split
from .stats import GenerationStats

__all__ = [
    "FlexOffloadCache",
    "FlexOffloadOPTForCausalLM",
    "GenerationStats",
    "InsufficientMemoryError",
    "PlacementReport",
    "Policy",
    "QuantConfig",
    "Split",
]
__version__ = "0.1.0"
