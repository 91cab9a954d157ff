"""HELM-style batch evaluation over ``datasets``: exact, resumable, data-parallel; and offline
batch generation from OpenAI Batch files (``read_requests``, ``run_batch_job``).

Example:
    >>> from hf_flexoffload.eval import evaluate
    >>> result = evaluate(model, tokenizer, "synthetic_reasoning:pattern_match", output_dir="runs")
    >>> result.metrics
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first use (``datasets`` and torch load only when evaluating).
_LAZY = {
    "BatchJobResult": ".batch_job",
    "run_batch_job": ".batch_job",
    "GenerationOptions": ".batch_requests",
    "read_requests": ".batch_requests",
    "Ranks": ".distributed",
    "ALL_METRICS": ".metrics",
    "normalize": ".metrics",
    "EvalResult": ".runner",
    "evaluate": ".runner",
    "Instance": ".scenario",
    "ScenarioSpec": ".scenario",
    "build_instances": ".scenario",
    "builtin_scenario": ".scenario",
    "load_splits": ".scenario",
    "synthetic_reasoning": ".synthetic",
}

if TYPE_CHECKING:
    from .batch_job import BatchJobResult, run_batch_job
    from .batch_requests import GenerationOptions, read_requests
    from .distributed import Ranks
    from .metrics import ALL_METRICS, normalize
    from .runner import EvalResult, evaluate
    from .scenario import Instance, ScenarioSpec, build_instances, builtin_scenario, load_splits
    from .synthetic import synthetic_reasoning


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_flexoffload.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ALL_METRICS",
    "BatchJobResult",
    "EvalResult",
    "GenerationOptions",
    "Instance",
    "Ranks",
    "ScenarioSpec",
    "build_instances",
    "builtin_scenario",
    "evaluate",
    "load_splits",
    "normalize",
    "read_requests",
    "run_batch_job",
    "synthetic_reasoning",
]
