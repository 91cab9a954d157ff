"""What to run before anything is loaded: the compute dtype (measured for ``dtype="auto"``), the
default workload and the policy ``offload_policy="auto"`` chooses, from a checkpoint's config and
tensor headers only."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..architectures import Architecture, architecture_for
from ..checkpoints.checkpoint import Checkpoint, open_checkpoint
from ..config.policy import Policy
from ..config.workload import Workload
from ..storage.tier_store import dtype_name
from ..storage.weight_layout import storage_dtype
from .cost_model import Estimate, estimate
from .dtype_choice import (
    CHECKPOINT,
    COMPRESSED,
    REQUESTED,
    DtypeCandidate,
    DtypeChoice,
    candidate_dtypes,
)
from .hardware import HardwareProfile
from .optimizer import InfeasiblePolicyError, optimize

logger = logging.getLogger(__name__)


def resolve_dtype(
    requested: torch.dtype | str | None, checkpoint: torch.dtype, device: torch.device
) -> torch.dtype:
    """The compute dtype: ``requested``, else the checkpoint's; never fp16 on a CPU, never bf16
    on a GPU without native bf16 (fp16 there). ``"auto"`` means the checkpoint's here:
    ``plan_load`` measures it before, except for compressed checkpoints.

    TF32 is left as the user set it (``torch.backends.cuda.matmul.allow_tf32``): turning it on
    would make fp32 checkpoints compute differently from stock transformers.
    """
    if requested is not None and requested != "auto":
        dtype = getattr(torch, requested, None) if isinstance(requested, str) else requested
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"Invalid dtype={requested!r}: compute in float32, bfloat16 or float16 (or "
                "'auto' to measure which is fastest, None for the checkpoint's)."
            )
        if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
            logger.warning(
                "dtype=bfloat16 on %s, which has no native bf16: it will be emulated (slow). "
                "float16 is this GPU's fast half precision.",
                device,
            )
        return dtype
    if checkpoint == torch.float16 and device.type == "cpu":
        logger.info(
            "fp16 checkpoint on CPU: computing in bfloat16 (fp16 matmuls are very slow on CPU)."
        )
        return torch.bfloat16
    if device.type == "cuda":
        return gpu_dtype(checkpoint, native_bf16(device))
    return checkpoint


def checkpoint_compute_dtype(
    requested: torch.dtype | str | None, ckpt, device: torch.device
) -> torch.dtype:
    """The compute dtype for the opened checkpoint ``ckpt``: a compressed checkpoint computes in
    the dtype it was saved for (its bytes were quantized from it), unless the user asks for
    another (which the engine then refuses, saying so); any other follows ``resolve_dtype``."""
    saved = ckpt.compression
    if saved is not None and requested in (None, "auto"):
        return saved.dtype
    return resolve_dtype(requested, saved.dtype if saved else ckpt.dtype(), device)


def gpu_dtype(checkpoint: torch.dtype, has_bf16: bool) -> torch.dtype:
    """The compute dtype on a GPU for a checkpoint's dtype: its own, except bf16 on a GPU
    without bf16 units (compute capability < 8.0, e.g. a T4), which computes in fp16."""
    if checkpoint == torch.bfloat16 and not has_bf16:
        logger.info(
            "bf16 checkpoint on a GPU without native bf16: computing in float16 (its fast half "
            "precision); pass dtype=torch.bfloat16 to keep bf16."
        )
        return torch.float16
    return checkpoint


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) has bf16 units, not emulation: compute capability >= 8.0."""
    # Asked of ``device`` itself: ``torch.cuda.is_bf16_supported`` only answers for the current
    # device, which need not be the one the model runs on.
    return torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class Plan:
    """What a load will use, decided before anything is loaded.

    Attributes:
        dtype: The compute dtype.
        storage: The dtype plain weights are stored in (``weight_layout.storage_dtype``).
        policy: The policy; with ``offload_policy="auto"``, the one chosen.
        estimate: Its predicted time and memory; None for a fixed policy with a given dtype
            (nothing is measured then).
        profile: The hardware profile (in ``dtype``) it was planned with; None likewise.
        choice: How the compute dtype was decided.
    """

    dtype: torch.dtype
    storage: torch.dtype
    policy: Policy
    estimate: Estimate | None
    profile: HardwareProfile | None
    choice: DtypeChoice


def plan_policy(
    path: str,
    *,
    config,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    offload_dir: str | None = None,
    max_memory: dict | None = None,
    workload: Workload | None = None,
    use_safetensors: bool | None = None,
) -> Plan:
    """What ``offload_policy="auto"`` (and ``dtype``, e.g. ``"auto"``) would choose for the
    checkpoint at ``path``, without loading it (only its config and tensor headers are read)."""
    arch = architecture_for(config)
    ckpt = open_checkpoint(path, use_safetensors)
    ckpt.rename(arch.renamed_tensors())
    workload = workload or default_workload(arch)
    return plan_load(arch, ckpt, "auto", dtype, device, offload_dir, max_memory, workload)


def plan_load(
    arch: Architecture,
    ckpt: Checkpoint,
    policy: Policy | str,
    dtype: torch.dtype | str | None,
    device: torch.device,
    offload_dir: str | None,
    max_memory: dict | None,
    workload: Workload,
) -> Plan:
    """The compute dtype, the storage dtype and the policy for loading ``ckpt``.

    ``dtype="auto"`` measures a profile per candidate dtype (``candidate_dtypes``), prices the
    workload in each (the best policy for ``policy="auto"``, else ``policy`` itself) and takes
    the fastest. A compressed checkpoint computes in the dtype it was saved for; ``None``
    follows the checkpoint (``resolve_dtype``); a dtype or its name is used as given.
    """
    if dtype == "auto" and ckpt.compression is None:
        return _measured_plan(arch, ckpt, policy, device, offload_dir, max_memory, workload)
    reason = REQUESTED if dtype not in (None, "auto") else CHECKPOINT
    reason = COMPRESSED if ckpt.compression is not None and reason != REQUESTED else reason
    dtype = checkpoint_compute_dtype(dtype, ckpt, device)
    storage = storage_dtype(ckpt.dtype(), dtype)
    capability = torch.backends.cpu.get_cpu_capability()
    if policy != "auto":
        return Plan(dtype, storage, policy, None, None, DtypeChoice(dtype, reason, (), capability))
    policy, est, profile = auto_policy(
        arch, ckpt, dtype, storage, device, offload_dir, max_memory, workload
    )
    choice = DtypeChoice(dtype, reason, (_candidate(dtype, policy, est, profile),), capability)
    return Plan(dtype, storage, policy, est, profile, choice)


def _measured_plan(
    arch: Architecture,
    ckpt: Checkpoint,
    policy: Policy | str,
    device: torch.device,
    offload_dir: str | None,
    max_memory: dict | None,
    workload: Workload,
) -> Plan:
    """``dtype="auto"``: plan in every candidate dtype, keep the fastest."""
    has_bf16 = device.type == "cuda" and native_bf16(device)
    plans, candidates, infeasible = {}, [], None
    for dtype in candidate_dtypes(device.type, has_bf16):
        storage = storage_dtype(ckpt.dtype(), dtype)
        if policy == "auto":
            try:
                found = auto_policy(
                    arch, ckpt, dtype, storage, device, offload_dir, max_memory, workload
                )
            except InfeasiblePolicyError as err:  # a wider dtype may not fit where bf16 does
                infeasible = err
                continue
        else:
            profile = planning_profile(arch, ckpt, dtype, storage, device, offload_dir, max_memory)
            est = estimate(arch, dtype, profile, workload, policy, storage=storage)
            found = (policy, est, profile)
        plans[dtype] = (storage, *found)
        candidates.append(_candidate(dtype, *found))
    if not plans:
        raise infeasible
    choice = DtypeChoice.measured(candidates, torch.backends.cpu.get_cpu_capability())
    logger.info("dtype='auto' chose %s", choice.describe())
    storage, policy, est, profile = plans[choice.dtype]
    return Plan(choice.dtype, storage, policy, est, profile, choice)


def _candidate(
    dtype: torch.dtype, policy: Policy, est: Estimate, profile: HardwareProfile
) -> DtypeCandidate:
    rows = policy.micro_batch_size
    return DtypeCandidate(dtype, est, rows, profile.matmul_rate(rows))


def planning_profile(
    arch: Architecture,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    storage: torch.dtype,
    device: torch.device,
    offload_dir: str | None,
    max_memory: dict | None,
) -> HardwareProfile:
    """The profile (in ``dtype``, matmuls at the model's shape) a plan for ``ckpt`` uses.

    The disk tier's capacity counts the checkpoint's own bytes when they can be read in place
    (safetensors in the storage dtype, nothing to quantize): placing them on disk writes nothing.
    """
    profile = HardwareProfile.measure(
        device,
        dtype,
        offload_dir=offload_dir,
        matrix=(arch.hidden, arch.ffn),
        max_memory=max_memory,
    )
    if ckpt.dtype() == storage and all(t.offset is not None for t in ckpt.tensors.values()):
        in_place = sum(t.row_bytes * (t.shape[0] if t.shape else 1) for t in ckpt.tensors.values())
        profile = replace(profile, disk_space=profile.disk_space + in_place)
    return profile


def auto_policy(
    arch: Architecture,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    storage: torch.dtype,
    device: torch.device,
    offload_dir: str | None,
    max_memory: dict | None,
    workload: Workload,
) -> tuple[Policy, Estimate, HardwareProfile]:
    """The policy ``offload_policy="auto"`` chooses for ``ckpt`` in ``dtype``, its estimate and
    the profile."""
    profile = planning_profile(arch, ckpt, dtype, storage, device, offload_dir, max_memory)
    saved = ckpt.compression
    compression = (saved.config, saved.embeddings) if saved is not None else None
    policy, chosen = optimize(
        arch, dtype, profile, workload, compression=compression, storage=storage
    )
    logger.info(
        "offload_policy='auto' chose %s in %s (predicted %.1f tok/s)",
        policy.to_json(indent=None),
        dtype_name(dtype),
        chosen.tokens_per_second,
    )
    return policy, chosen, profile


def default_workload(arch: Architecture) -> Workload:
    """FlexGen's benchmark workload (512-token prompts, 32 new tokens), shortened to fit models
    with fewer positions."""
    prompt = min(512, max(1, arch.max_positions // 2))
    return Workload(prompt_len=prompt, gen_len=min(32, max(1, arch.max_positions - prompt)))
