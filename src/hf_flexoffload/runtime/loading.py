"""A checkpoint into an ``OffloadEngine``: everything checked before a byte is written, then the
weights placed stage by stage.

``load_engine`` opens the checkpoint, plans the compute dtype and the policy from its config and
tensor headers (``planning.load_plan``), lays the weights out and checks them against the
checkpoint's tensors and the memory of every tier (the placement, the load peak, the offload
directory's free space), and only then writes, reusing the files an earlier load with the same
settings left in an explicit ``offload_dir``. Each model's files go to a directory of their own
under ``offload_dir/weights`` (``storage.offload_dir``), named by everything that decides their
bytes, so models and processes sharing an ``offload_dir`` never use each other's files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace

import torch

from ..architectures import architecture_for
from ..checkpoints.checkpoint import check_tensors, open_checkpoint
from ..checkpoints.checkpoint_store import bytes_to_write, load_chunk_bytes, load_into_store
from ..config.counters import Counters
from ..config.expert_usage import ExpertUsage
from ..config.policy import Policy
from ..config.workload import Workload
from ..planning.budget import Capacities, bound_heap_slack, return_freed_memory
from ..planning.load_plan import checkpoint_compute_dtype, default_workload, plan_load
from ..planning.memory_model import MODEL_ITEMS, footprint
from ..storage.disk_file import check_writable
from ..storage.offload_dir import ModelDirectory
from ..storage.tier_store import TierStore, dtype_name
from ..storage.weight_layout import layout_for, placement_report, warn_if_inflated
from .engine import OffloadEngine, resolve_direct_io

logger = logging.getLogger(__name__)

# 2: QuantConfig.dim=None groups weights along their input channels (in 1: output channels),
# so an offload directory written by 1 holds other bytes for the same policy.
FORMAT_VERSION = 2


def load_engine(
    path: str,
    *,
    config,
    policy: Policy | str,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    offload_dir: str | None = None,
    max_memory: dict | None = None,
    workload: Workload | None = None,
    use_safetensors: bool | None = None,
    expert_usage: ExpertUsage | None = None,
) -> OffloadEngine:
    """The checkpoint in ``path`` placed under ``policy`` (a Policy or ``"auto"``), ready to run.

    Raises ``InsufficientMemoryError`` (before anything is written) when the placement or the
    load does not fit, and ``ValueError`` when the checkpoint does not match its config.
    """
    arch = architecture_for(config)
    if expert_usage is not None:  # experts placed most used first
        arch = arch.with_expert_usage(expert_usage)
    ckpt = open_checkpoint(path, use_safetensors)
    ckpt.rename(arch.renamed_tensors())
    saved = ckpt.compression
    if saved is not None and checkpoint_compute_dtype(dtype, ckpt, device) != saved.dtype:
        raise ValueError(
            f"{path!r} is a compressed checkpoint for dtype {saved.dtype}; load it with "
            "dtype=None (or that dtype), or compress the original checkpoint for another."
        )
    if saved is not None and policy != "auto":
        saved.check(policy, path)
    bound_heap_slack()
    caps = Capacities.measure(device, offload_dir, max_memory)
    auto, workload = policy == "auto", workload or default_workload(arch)
    plan = plan_load(arch, ckpt, policy, dtype, device, offload_dir, max_memory, workload)
    dtype, storage, policy, chosen = plan.dtype, plan.storage, plan.policy, plan.estimate
    layouts = layout_for(arch, policy, dtype, storage)
    check_tensors(ckpt, layouts, layouts[-1].aliases.values(), compressed=saved is not None)
    report = placement_report(layouts, policy.weights)
    to_write = bytes_to_write(ckpt, layouts)
    in_place = report.bytes_per_tier["disk"] - to_write  # read from the checkpoint's files
    report = replace(report, in_place_bytes=in_place)
    warn_if_inflated(report)
    quantizing = policy.compress_weights is not None and saved is None
    held, load_peak = footprint(
        arch,
        dtype,
        policy,
        workload,
        shared=caps.shared,
        storage=storage,
        quantizing=quantizing,
    )
    held = held.only(MODEL_ITEMS)
    report = replace(report, memory=held)
    caps = replace(caps, disk=caps.disk + in_place)  # the checkpoint's bytes are there already
    caps.check(held.per_tier, "The weight placement", detail=held.table())
    caps.check({"host": load_peak}, "Loading the weights (resident share + load buffers)")

    owns_dir = offload_dir is None
    directory = tempfile.mkdtemp(prefix="hf_flexoffload-") if owns_dir else offload_dir
    counters = Counters()
    fingerprint = {
        "format": FORMAT_VERSION,
        "checkpoint": ckpt.fingerprint(),
        "config": config_identity(config),
        "dtype": dtype_name(dtype),
        "storage": dtype_name(storage),
        "weights": list(policy.weights.fractions),
        "compress_weights": policy.to_dict()["compress_weights"],
        "compress_embeddings": policy.compress_embeddings,
    }
    check_writable(os.path.join(directory, "weights"), to_write)
    model_dir = ModelDirectory(os.path.join(directory, "weights"), fingerprint)
    store = TierStore(device, model_dir.path, counters, pin=policy.pin_weights)
    try:
        store.direct_io = resolve_direct_io(policy, store)
        start = time.perf_counter()
        with model_dir.loading():
            store.open_index(fingerprint)
            load_into_store(ckpt, layouts, store, load_chunk_bytes(arch.largest_layer_tensor))
            return_freed_memory()
            store.prune()
            if to_write:
                store.write_index(fingerprint)
        model_dir.prune_others()
        logger.info("Placed weights in %.1fs:\n%s", time.perf_counter() - start, report)
    except BaseException:
        store.release()
        model_dir.close()
        if owns_dir:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return OffloadEngine(
        arch=arch,
        policy=policy,
        layouts=layouts,
        store=store,
        device=device,
        dtype=dtype,
        storage=storage,
        offload_dir=directory,
        owns_dir=owns_dir,
        counters=counters,
        max_memory=max_memory,
        workload=workload,
        auto=auto,
        estimate=chosen,
        report=report,
        model_dir=model_dir,
    )


def config_identity(config) -> dict:
    """The model config as it decides the weights' layout (without where it was read from)."""
    skip = ("_name_or_path", "transformers_version", "_commit_hash")
    kept = {k: v for k, v in sorted(config.to_dict().items()) if k not in skip}
    return json.loads(json.dumps(kept, default=str))  # as the index will read it back
