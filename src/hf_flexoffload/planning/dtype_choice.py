"""Choosing the compute dtype by measurement (``dtype="auto"``): which dtypes compete on a
device, and which wins from the cost model's estimates.

The fast compute dtype depends on the machine, not on the checkpoint: on an AVX2-only CPU bf16
matmuls run about 6x slower than fp32, on a CPU with AMX they run 4-6x faster. The planner
(load_plan.py) measures a hardware profile per candidate, prices the workload in each and hands
the estimates here; this module only compares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..storage.tier_store import dtype_name
from .cost_model import Estimate

# How the compute dtype was decided, as ``DtypeChoice.reason`` says it.
MEASURED = "measured"
REQUESTED = "requested"
CHECKPOINT = "the checkpoint's"
COMPRESSED = "the compressed checkpoint's"


def candidate_dtypes(device_type: str, has_bf16: bool = False) -> tuple[torch.dtype, ...]:
    """The compute dtypes ``dtype="auto"`` measures on a device, widest first.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        has_bf16: A CUDA device with bf16 units (``planning.native_bf16``).

    Never fp16 on a CPU: its matmuls there are slower than either fp32 or bf16 by far.
    """
    if device_type != "cuda":
        return (torch.float32, torch.bfloat16)
    return (torch.float32, torch.float16) + ((torch.bfloat16,) if has_bf16 else ())


def choose_dtype(estimates: Mapping[torch.dtype, Estimate]) -> torch.dtype:
    """The dtype with the best predicted tokens/s; on a tie the earlier one (the wider, as
    ``candidate_dtypes`` orders them: the same speed for more precision).

    Raises:
        ValueError: No estimates.
    """
    if not estimates:
        raise ValueError("choose_dtype needs at least one {dtype: Estimate}.")
    best = None
    for dtype, est in estimates.items():
        if best is None or est.tokens_per_second > estimates[best].tokens_per_second:
            best = dtype
    return best


@dataclass(frozen=True)
class DtypeCandidate:
    """One compute dtype as the planner priced it.

    Attributes:
        dtype: The compute dtype.
        estimate: The cost model's estimate of the workload in it (the best policy found, or
            the fixed policy).
        rows: Rows of one decode matmul under that policy (a micro-batch).
        matmul_flops: The measured ``F.linear`` FLOP/s at those rows in this dtype.
    """

    dtype: torch.dtype
    estimate: Estimate
    rows: int
    matmul_flops: float

    def describe(self) -> str:
        return (
            f"{dtype_name(self.dtype)} {self.estimate.tokens_per_second:.1f} tok/s predicted "
            f"(matmul {self.matmul_flops / 1e9:.0f} GFLOP/s at {self.rows} rows)"
        )


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype and how it was decided.

    Attributes:
        dtype: The compute dtype.
        reason: ``MEASURED`` (``dtype="auto"``: the candidate predicted fastest), ``REQUESTED``
            (an explicit dtype), ``CHECKPOINT`` (``dtype=None``: the checkpoint's, fp16 as bf16
            on a CPU) or ``COMPRESSED`` (the dtype a compressed checkpoint was saved for).
        candidates: What each measured dtype was predicted to do; only the chosen one's when
            nothing was compared (empty when nothing was estimated: a fixed policy).
        cpu_capability: The CPU's vector instruction set (``AVX2``, ``AVX512``...), which
            decides whether bf16 matmuls are fast on it.
    """

    dtype: torch.dtype
    reason: str
    candidates: tuple[DtypeCandidate, ...] = ()
    cpu_capability: str = ""

    @classmethod
    def measured(cls, candidates: list[DtypeCandidate], cpu_capability: str) -> DtypeChoice:
        """The fastest of ``candidates`` (see ``choose_dtype``)."""
        dtype = choose_dtype({c.dtype: c.estimate for c in candidates})
        return cls(dtype, MEASURED, tuple(candidates), cpu_capability)

    def describe(self) -> str:
        """One line: the dtype, why, and each candidate's prediction (the log and the CLI)."""
        head = f"compute dtype {dtype_name(self.dtype)} ({self.reason}"
        head += f"; CPU capability {self.cpu_capability})" if self.cpu_capability else ")"
        if self.reason != MEASURED:
            return head
        return head + ": " + "; ".join(c.describe() for c in self.candidates)
