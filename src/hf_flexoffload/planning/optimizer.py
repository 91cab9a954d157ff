"""Choosing a policy: for each candidate block shape, a linear program over the placement.

For every candidate (micro_batch_size, num_micro_batches, compression, host attention) a pulp LP
picks the nine placement fractions (weights, KV cache and activations on device, host and disk)
that minimize the cost model's time per sequence subject to every tier's capacity. A layer's
time is the max of its concurrent terms, written as auxiliary variables bounded below by each
term, so the LP is exact for the cost model. Candidates are visited best lower bound first (their
time with everything in fast memory), and the search stops once no remaining candidate can beat
the best solution found.

On a CPU-only machine device and host are the same RAM, so the host fractions are fixed at 0
and one capacity covers both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import pulp
import torch

from ..architectures import Architecture
from ..config.counters import human_bytes
from ..config.policy import TIERS, Policy, QuantConfig, Split
from ..config.workload import Workload
from .budget import InsufficientMemoryError
from .cost_model import Estimate, Rates, estimate, estimate_from_sizes, step_terms
from .hardware import HardwareProfile
from .memory_model import memory_terms
from .model_sizes import KINDS, VARIABLES, Affine, ModelSizes

logger = logging.getLogger(__name__)

Q4 = QuantConfig()  # weights: 4 bits, groups of 32 input channels, searched rounding
# The KV cache: groups of 64 along the head dimension (a whole head of most models), min-max
# rounding because every new token is quantized at run time.
Q4_CACHE = QuantConfig(bits=4, group_size=64, rounding="minmax")
_MAX_MICRO_BATCHES = 16
_TIE_BREAK = 1e-3
HEADROOM = 0.9
_ALL_FAST = {v: 1.0 if v.endswith(".device") else 0.0 for v in VARIABLES}


class InfeasiblePolicyError(InsufficientMemoryError):
    """No policy fits the capacities; the message says the smallest memory that would.

    Attributes:
        needed: That smallest memory in bytes: ``{"ram", "disk"}`` on a CPU-only machine,
            ``{"device", "host", "disk"}`` otherwise.
    """

    def __init__(self, message: str, needed: dict[str, int]) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class _Candidate:
    policy: Policy  # block shape, compression and flags; placement filled in by the LP
    lower_bound: float  # seconds per sequence with everything in fast memory


def optimize(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    *,
    fixed: Policy | None = None,
    compression: tuple[QuantConfig | None, bool] | None = None,
    storage: torch.dtype | None = None,
) -> tuple[Policy, Estimate]:
    """The policy with the best predicted throughput that fits ``profile``'s capacities.

    Args:
        arch: The model's architecture.
        dtype: The compute dtype.
        profile: The machine, capacities capped by ``max_memory``.
        workload: Prompt and generation lengths, and the block size if it is given.
        fixed: A loaded model's policy: its weight split, compression and overlap are kept and
            only micro-batching, cache, activations and host attention are chosen.
        compression: ``(compress_weights, compress_embeddings)`` of a compressed checkpoint,
            which every candidate must use.
        storage: The dtype plain weights are stored in (``dtype`` when None).

    Returns:
        The chosen policy and its estimate.

    Raises:
        InfeasiblePolicyError: Nothing fits; the message says the smallest memory that would.
    """
    candidates = _candidates(arch, dtype, profile, workload, fixed, compression, storage)
    best: tuple[float, Policy, Estimate] | None = None
    solved = 0
    for cand in sorted(candidates, key=lambda c: c.lower_bound):
        if best is not None and cand.lower_bound >= best[0]:
            break
        found = _solve(arch, dtype, profile, workload, cand.policy, fixed, storage)
        solved += 1
        if found is None:
            continue
        policy, est = found
        per_sequence = est.total_seconds / est.block_size
        if best is None or per_sequence < best[0]:
            best = (per_sequence, policy, est)
    logger.info("Policy search: %d candidates, %d LPs solved", len(candidates), solved)
    if best is None:
        raise InfeasiblePolicyError(*_infeasible(arch, dtype, profile, workload, fixed, storage))
    return best[1], best[2]


# -- candidates --------------------------------------------------------------------------------


def _block_shapes(workload: Workload) -> list[tuple[int, int]]:
    powers = [2**i for i in range(12)]
    if workload.batch_size is not None:
        b = workload.batch_size
        sizes = sorted({m for m in powers if m < b} | {b})
        return [(m, math.ceil(b / m)) for m in sizes if math.ceil(b / m) <= _MAX_MICRO_BATCHES]
    cap = workload.max_batch_size
    return [(m, k) for m in powers for k in powers if m * k <= cap and k <= _MAX_MICRO_BATCHES]


def _candidates(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    fixed: Policy | None,
    compression: tuple[QuantConfig | None, bool] | None,
    storage: torch.dtype | None,
) -> list[_Candidate]:
    if fixed is not None:
        kinds = [
            dict(
                compress_weights=fixed.compress_weights,
                compress_cache=fixed.compress_cache,
                compress_embeddings=fixed.compress_embeddings,
                overlap=fixed.overlap,
                direct_io=fixed.direct_io,
            )
        ]
    elif compression is not None:
        kinds = [dict(compress_weights=compression[0], compress_embeddings=compression[1])]
        if workload.allow_compression:
            kinds.append({**kinds[0], "compress_cache": Q4_CACHE})
    else:
        kinds = [{}]
        if workload.allow_compression:
            kinds += [dict(compress_weights=Q4), dict(compress_weights=Q4, compress_cache=Q4_CACHE)]
    if fixed is None:
        # Overlap changes no memory, and the model prices an overlapped layer at
        # max + penalty * (sum - max): better than running in turn exactly when penalty < 1
        # (on few cores the I/O thread's copies can slow compute more than they hide).
        kinds = [{**kind, "overlap": profile.overlap_penalty < 1.0} for kind in kinds]
        if profile.direct_overlap_penalty is not None:
            # Reading weights directly (no page cache) can be the better trade when the disk
            # tier will not stay cached anyway: same cold rate, reads that overlap better.
            kinds += [
                {**kind, "direct_io": True, "overlap": profile.direct_overlap_penalty < 1.0}
                for kind in kinds
            ]
    host_attention = [True] if profile.shared else [True, False]
    out = []
    for kind in kinds:
        for m, k in _block_shapes(workload):
            for ha in host_attention:
                policy = Policy(micro_batch_size=m, num_micro_batches=k, host_attention=ha, **kind)
                sizes = ModelSizes.of(arch, dtype, policy, storage)
                est = estimate_from_sizes(sizes, profile, workload, policy, _ALL_FAST)
                out.append(_Candidate(policy, est.total_seconds / policy.block_size))
    return out


# -- the LP ------------------------------------------------------------------------------------


def _solve(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
    fixed: Policy | None,
    storage: torch.dtype | None,
) -> tuple[Policy, Estimate] | None:
    """Place ``policy``'s bytes by LP; None when no placement fits."""
    sizes = ModelSizes.of(arch, dtype, policy, storage)
    best = None
    for offloaded in (False, True):
        found = _solve_variant(
            arch, dtype, profile, workload, policy, fixed, sizes, offloaded, storage
        )
        if found is not None and (best is None or found[1].total_seconds < best[1].total_seconds):
            best = found
    return best


def _solve_variant(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
    fixed: Policy | None,
    sizes: ModelSizes,
    offloaded: bool,
    storage: torch.dtype | None,
) -> tuple[Policy, Estimate] | None:
    caps = planning_capacities(profile)
    for _ in range(4):
        values = _lp(sizes, profile, workload, policy, fixed, caps, offloaded)
        if values is None:
            return None
        placed = _with_fractions(policy, values, fixed)
        est = estimate(arch, dtype, profile, workload, placed, storage=storage)
        excess = _excess(est.peak_bytes, profile)
        if not any(excess.values()):
            return placed, est
        # Whole rows and whole cache units round the fractions: tighten and solve again.
        for t, over in excess.items():
            caps[t] -= over * 1.05 + 2**20
    return None


def planning_capacities(profile: HardwareProfile) -> dict[str, float]:
    """What the plan may fill: memory tiers keep ``HEADROOM`` free for what the model does not
    count (allocator fragmentation, transformers' own tensors during ``generate``)."""
    caps = {t: float(profile.capacity(t)) for t in TIERS}
    for t in ("device", "host"):
        caps[t] *= HEADROOM
    return caps


def _solver() -> pulp.LpSolver:
    """HiGHS (``pulp[highs]``, a dependency); pulp's bundled CBC only where highspy is missing:
    pulp 3.3 deprecates it and 4.0 removes it."""
    highs = pulp.HiGHS(msg=False)
    return highs if highs.available() else pulp.PULP_CBC_CMD(msg=False)


def _lp(
    sizes: ModelSizes,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
    fixed: Policy | None,
    caps: dict[str, float],
    offloaded: bool,
) -> dict[str, float] | None:
    s, n = workload.prompt_len, workload.gen_len
    kv_total = policy.block_size * sizes.kv_positions(s + n) * sizes.kv_token
    rates = Rates.of(sizes, profile, kv_total, policy.direct_io)
    prob = pulp.LpProblem("flexoffload_policy", pulp.LpMinimize)
    x = {v: prob.add_variable(v.replace(".", "_"), 0, 1) for v in VARIABLES}

    def expr(a: Affine):
        return pulp.lpSum(c * x[v] for v, c in a.coef.items()) + a.const

    for kind in KINDS:
        prob += pulp.lpSum(x[f"{kind}.{t}"] for t in TIERS) == 1
        if profile.shared:
            prob += x[f"{kind}.host"] == 0
    if fixed is not None:
        for t in TIERS:
            prob += x[f"weights.{t}"] == getattr(fixed.weights, t)
    if not offloaded:
        prob += x["weights.disk"] == 0
        if not profile.shared:
            prob += x["weights.device"] == 1

    total = 0
    phases = (("prefill", s, 0.0, 1), ("decode", 1, s + n / 2, n - 1))
    for name, tokens, context, steps in phases:
        layer, rest = step_terms(
            sizes, profile, rates, policy, tokens=tokens, context=context, first=name == "prefill"
        )
        # A layer takes (1 - penalty) * (its slowest thread) + penalty * (all threads), as in
        # cost_model.combine; the slowest thread is t, bounded below by every thread's term.
        # A penalty above 1 (threads that slow each other) is not convex in t: the LP prices
        # such a fixed overlapped policy as the sum, and its estimate applies the real penalty.
        every = pulp.lpSum(expr(term) for term in layer.values())
        penalty = min(1.0, profile.penalty_for(policy.direct_io)) if policy.overlap else 1.0
        t = prob.add_variable(f"t_{name}", 0)
        for term in layer.values():
            prob += t >= expr(term)
        layer_time = (1 - penalty) * t + penalty * every
        # Ties (I/O hidden under compute) go to the placement that moves the fewest bytes.
        layer_time = layer_time + _TIE_BREAK * every
        total = total + steps * (sizes.layers * layer_time + expr(rest))
    prob += total * (1.0 / policy.block_size)

    mem = memory_terms(sizes, profile.shared, policy, workload, offloaded)
    if profile.shared:
        prob += expr(mem["device"]) + expr(mem["host"]) <= min(caps["device"], caps["host"])
        prob += expr(mem["disk"]) <= caps["disk"]
    else:
        for t in TIERS:
            prob += expr(mem[t]) <= caps[t]
    prob.solve(_solver())
    if pulp.LpStatus[prob.status] != "Optimal":
        return None
    return {v: min(1.0, max(0.0, var.value() or 0.0)) for v, var in x.items()}


def _with_fractions(policy: Policy, values: dict[str, float], fixed: Policy | None) -> Policy:
    def split(kind: str) -> Split:
        raw = [round(values[f"{kind}.{t}"], 4) for t in TIERS]
        raw[-1] = round(1.0 - raw[0] - raw[1], 4)  # keep the sum exactly 1
        return Split(**dict(zip(TIERS, raw, strict=True)))

    weights = fixed.weights if fixed is not None else split("weights")
    return replace(policy, weights=weights, cache=split("cache"), activations=split("activations"))


def _excess(peak: dict[str, int], profile: HardwareProfile) -> dict[str, float]:
    caps = planning_capacities(profile)
    if profile.shared:
        over = peak["device"] + peak["host"] - min(caps["device"], caps["host"])
        disk = max(0, peak["disk"] - caps["disk"])
        return {"device": max(0, over), "host": 0, "disk": disk}
    return {t: max(0, peak[t] - caps[t]) for t in TIERS}


# -- when nothing fits -------------------------------------------------------------------------


def _infeasible(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    fixed: Policy | None,
    storage: torch.dtype | None,
) -> tuple[str, dict[str, int]]:
    """The smallest memory per tier that one sequence would need, everything offloaded."""
    batch = workload.batch_size or 1
    smallest = Policy(micro_batch_size=batch)
    if fixed is not None:
        smallest = replace(fixed, micro_batch_size=batch, num_micro_batches=1)
    elif workload.allow_compression:
        smallest = replace(smallest, compress_weights=Q4, compress_cache=Q4_CACHE)
    values = {v: 1.0 if v.endswith(".disk") else 0.0 for v in VARIABLES}
    if fixed is not None:
        values.update({f"weights.{t}": getattr(fixed.weights, t) for t in TIERS})
    sizes = ModelSizes.of(arch, dtype, smallest, storage)
    mem = memory_terms(sizes, profile.shared, smallest, workload, offloaded=True)
    need = {t: int(mem[t].at(values) / (HEADROOM if t != "disk" else 1.0)) + 1 for t in TIERS}
    what = f"{batch} sequence(s) of {workload.prompt_len} + {workload.gen_len} tokens" + (
        ", compressed to 4 bits" if smallest.compress_weights else ""
    )
    if profile.shared:
        ram = need["device"] + need["host"]
        needed = {"ram": ram, "disk": need["disk"]}
        has = min(profile.device_memory, profile.host_memory)
        memory = f"at least {human_bytes(ram)} of RAM (has {human_bytes(has)})"
    else:
        needed = dict(need)
        memory = (
            f"at least {human_bytes(need['device'])} of device memory (has "
            f"{human_bytes(profile.device_memory)}) and {human_bytes(need['host'])} of host RAM "
            f"(has {human_bytes(profile.host_memory)})"
        )
    hint = "" if workload.allow_compression else ", or allow compression"
    return (
        f"No offload policy fits this machine: even with every weight, the KV cache and the "
        f"hidden states on disk, {what} need {memory} for staging buffers and workspace, and "
        f"{human_bytes(need['disk'])} of disk (has {human_bytes(profile.disk_space)}). Raise "
        f"max_memory (or free memory), use a shorter prompt or fewer new tokens{hint}."
    ), needed
