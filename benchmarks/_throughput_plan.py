"""The throughput suite's runs: each system, batch, budget and compute dtype, and what a run
measured.

Split from throughput.py (which runs the suite): ``plan_runs`` reads only the arguments, the
hardware profiles (one per compute dtype a run may use) and the model's shape.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field, replace

import torch
from _common import fastest_dtype

from hf_flexoffload import Policy, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.planning.cost_model import estimate
from hf_flexoffload.planning.hardware import HardwareProfile
from hf_flexoffload.storage.weight_layout import storage_dtype

# -- what runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One system at one batch size in one configuration."""

    config: str  # "resident", "offload" or "cold disk"
    system: str  # row label
    kind: str  # "stock", "accelerate" or "ours"
    batch: int
    policy: dict | str | None = None  # ours: a Policy dict or "auto"
    budget: int | None = None  # peak anonymous RSS allowed above baseline
    dtype: str = "float32"  # compute dtype; ours: "auto" too


@dataclass
class Result:
    run: Run
    tokens_per_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    disk_read_per_step: float = 0.0
    weights_read_per_step: float = 0.0
    chosen: dict | None = None
    batch: int = 0  # what ran: the auto policy picks its own block
    dtype: str = ""  # what ran: ours' dtype="auto" picks its own
    device_peaks: dict = field(default_factory=dict)  # GPU and pinned-host peaks (CUDA)
    cgroup_peak: list[int] = field(default_factory=list)  # capped runs: page cache included
    errors: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.batch or self.run.batch

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def fits(self) -> bool:
        return self.run.budget is None or max(self.peak) <= self.run.budget


def _fitting(
    policy: Policy,
    shape: OPTShape,
    profiles: dict[str, HardwareProfile],
    args: argparse.Namespace,
    budget: int,
) -> Policy:
    """``policy`` with as much of the KV cache in RAM as the cost model says fits the budget
    (the rest on disk), in steps of 5%, in every dtype ours may pick."""
    workload = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len)
    checkpoint = getattr(torch, args.checkpoint_dtype)
    for percent in range(100, -1, -5):
        in_ram = percent / 100
        candidate = replace(policy, cache=Split(device=in_ram, disk=round(1 - in_ram, 2)))
        peaks = [
            estimate(
                shape,
                getattr(torch, name),
                profile,
                workload,
                candidate,
                storage=storage_dtype(checkpoint, getattr(torch, name)),
            ).peak_bytes
            for name, profile in profiles.items()
        ]
        if all(peak["device"] + peak["host"] <= budget for peak in peaks):
            return candidate
    return replace(policy, cache=Split(disk=1.0))


def plan_runs(
    args: argparse.Namespace,
    profiles: dict[str, HardwareProfile],
    shape: OPTShape,
    weight_bytes: int,
) -> list[Run]:
    share = int(args.weights_in_ram * weight_bytes)
    budget = share + args.working_memory
    offloaded = Split(device=args.weights_in_ram, disk=1 - args.weights_in_ram)
    profile = next(iter(profiles.values()))  # the overlap flags: the widest dtype's probes

    def best(b: int) -> str:  # the baselines' dtype at this batch
        return fastest_dtype(profiles, b, args.prompt_len, args.gen_len)

    ours = args.dtype
    runs = []
    for b in args.resident_batches:
        runs.append(Run("resident", "stock transformers", "stock", b, dtype=best(b)))
    for b in args.ours_resident_batches:
        resident = Policy(micro_batch_size=b)
        runs.append(Run("resident", "ours, all resident", "ours", b, resident, dtype=ours))
    for b in args.offload_batches:
        runs.append(Run("offload", "accelerate device_map", "accelerate", b, None, budget, best(b)))
    for b in args.ours_batches:
        cached = _fitting(
            Policy(micro_batch_size=b, weights=offloaded, overlap=profile.penalty_for(False) < 1),
            shape,
            profiles,
            args,
            budget,
        )
        direct = replace(cached, direct_io=True, overlap=profile.penalty_for(True) < 1)
        runs.append(Run("offload", "ours, fixed split", "ours", b, cached, budget, ours))
        runs.append(Run("cold disk", "ours, O_DIRECT", "ours", b, direct, budget, ours))
    runs.append(Run("offload", "ours, auto", "ours", args.auto_max_batch, "auto", budget, ours))
    if args.only:
        runs = [r for r in runs if args.only in f"{r.config} {r.system}"]
    return [
        Run(**{**r.__dict__, "policy": r.policy.to_dict()}) if isinstance(r.policy, Policy) else r
        for r in runs
    ]
