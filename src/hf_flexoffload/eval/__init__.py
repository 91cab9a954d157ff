"""HELM-style batch evaluation over ``datasets``: exact, resumable, data-parallel.

Example:
    >>> from hf_flexoffload.eval import evaluate
    >>> result = evaluate(model, tokenizer, "synthetic_reasoning:pattern_match", output_dir="runs")
    >>> result.metrics
"""

from .distributed import Ranks
from .metrics import ALL_METRICS, normalize
from .runner import EvalResult, evaluate
from .scenario import Instance, ScenarioSpec, build_instances, builtin_scenario, load_splits
from .synthetic import synthetic_reasoning

__all__ = [
    "ALL_METRICS",
    "EvalResult",
    "Instance",
    "Ranks",
    "ScenarioSpec",
    "build_instances",
    "builtin_scenario",
    "evaluate",
    "load_splits",
    "normalize",
    "synthetic_reasoning",
]
