"""The offloaded model without the transformers API: placed weights and block forward passes.

An ``OffloadEngine`` holds what ``loading.load_engine`` placed (the weights in the tiers, their
layout, the byte counters) and runs the forward passes: ``forward`` is one token step of a block
through the zig-zag schedule, and ``begin_run``/``end_run`` frame the forwards of one ``generate``
call. What a call may use and the policy it runs under come from ``RunPlanning``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass

import torch

from ..architectures import Architecture
from ..checkpoints.checkpoint import INDEX_FILE, SINGLE_FILE
from ..checkpoints.compressed_checkpoint import SavedCompression, save_store
from ..config.counters import Counters
from ..config.policy import Policy
from ..config.workload import Workload
from ..planning.cost_model import Estimate
from ..planning.expert_fetch import fetches_routed
from ..planning.int4_kernel_choice import kernel_rows
from ..planning.load_plan import default_workload
from ..planning.memory_model import Footprint
from ..storage.activations import ActivationStore
from ..storage.offload_cache import FlexOffloadCache
from ..storage.offload_dir import ModelDirectory
from ..storage.placement import PlacementReport
from ..storage.tier_store import TierStore
from ..storage.transfer import Mover, upload
from ..storage.weight_layout import StageLayout, placement_report
from ..storage.weights import WeightFetcher
from .run_planning import RunPlanning
from .schedule import MicroBatch, run_block
from .stats import ForwardTimes, GenerationStats

logger = logging.getLogger(__name__)


def resolve_direct_io(policy: Policy, store: TierStore) -> bool:
    """Whether disk weights are read with O_DIRECT: as the policy asks, where the filesystem
    allows it."""
    if not policy.direct_io or store.supports_direct_io():
        return policy.direct_io
    logger.warning(
        "direct_io=True but %s does not support O_DIRECT (tmpfs?); reading through the page "
        "cache instead. Put offload_dir on a disk filesystem to bypass it.",
        store.directory,
    )
    return False


@dataclass
class _Run:
    """The policy and timing of the forward passes of one generate call."""

    policy: Policy
    times: ForwardTimes
    forwards: int = 0
    tokens: int = 0
    memory: Footprint | None = None
    generating: bool = False


class OffloadEngine(RunPlanning):
    """Placed weights, the byte counters and the machinery for forward passes."""

    def __init__(
        self,
        *,
        arch: Architecture,
        policy: Policy,
        layouts: list[StageLayout],
        store: TierStore,
        device: torch.device,
        dtype: torch.dtype,
        storage: torch.dtype,
        offload_dir: str,
        owns_dir: bool,
        counters: Counters,
        max_memory: dict | None,
        workload: Workload | None = None,
        auto: bool = False,
        estimate: Estimate | None = None,
        report: PlacementReport | None = None,
        model_dir: ModelDirectory | None = None,
    ) -> None:
        self.arch = arch
        self.policy = policy
        self.layouts = layouts
        self.store = store
        self.device = device
        self.dtype = dtype
        self.storage = storage
        self.offload_dir = offload_dir
        self.counters = counters
        self.max_memory = max_memory
        self.workload = workload or default_workload(arch)
        self.auto = auto
        self._estimate = estimate
        self.report: PlacementReport = report or placement_report(layouts, policy.weights)
        self.fetcher = WeightFetcher(
            layouts,
            store,
            counters,
            range(1, arch.layers + 1),
            arch.embeddings,
            chunk_budget=arch.largest_layer_tensor * dtype.itemsize // 4,
            kernel_rows=kernel_rows(
                policy.int4_kernel_rows, layouts, device, dtype, (arch.hidden, arch.ffn)
            ),
        )
        self.mover = Mover(device, policy.overlap)
        self.runtime_dir = os.path.join(
            offload_dir, f"runtime-{os.getpid()}-{id(self):x}-{uuid.uuid4().hex[:8]}"
        )
        self._run = _Run(policy, ForwardTimes(device))
        self._cleanup = weakref.finalize(
            self,
            _cleanup,
            self.mover,
            self.fetcher,
            store,
            offload_dir if owns_dir else None,
            self.runtime_dir,
            model_dir,
        )

    def new_cache(self, capacity: int = 0, policy: Policy | None = None) -> FlexOffloadCache:
        policy = policy or self._run.policy
        return FlexOffloadCache(
            num_layers=self.arch.layers,
            windows=self.arch.kv_windows,
            split=policy.cache,
            host_attention=policy.host_attention,
            heads=self.arch.kv_heads,
            head_dim=self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
            directory=self.runtime_dir,
            counters=self.counters,
            capacity=capacity,
            compress=policy.compress_cache,
        )

    def save_compressed(self, directory: str) -> str:
        """Write the compressed weights as a safetensors checkpoint in ``directory``.

        Returns:
            The path of the written file.
        """
        if self.policy.compress_weights is None:
            raise ValueError(
                "This model's weights are not compressed: load it with a policy that sets "
                "compress_weights=QuantConfig(...) before saving it compressed."
            )
        os.makedirs(directory, exist_ok=True)
        taken = [n for n in (SINGLE_FILE, INDEX_FILE) if os.path.exists(os.path.join(directory, n))]
        if taken:
            raise FileExistsError(
                f"{directory!r} already holds a checkpoint ({', '.join(taken)}); save the "
                "compressed weights to a new directory so nothing is overwritten."
            )
        saved = SavedCompression(
            config=self.policy.compress_weights,
            embeddings=self.policy.compress_embeddings,
            dtype=self.dtype,
        )
        path = os.path.join(directory, SINGLE_FILE)
        save_store(path, self.layouts, self.store, saved.metadata())
        return path

    def begin_run(self, policy: Policy | None = None, memory: Footprint | None = None) -> None:
        """Start the forward passes of one ``generate`` call (checked by ``check_fits``)."""
        self.counters.reset_run()
        self._run = _Run(
            policy or self.policy, ForwardTimes(self.device), memory=memory, generating=True
        )
        self.store.direct_io = resolve_direct_io(self._run.policy, self.store)

    def end_run(self, batch: int) -> GenerationStats:
        run = self._run
        self._run = _Run(self.policy, ForwardTimes(self.device))
        prefill, decode = run.times.totals()
        return GenerationStats(
            policy=run.policy,
            prefill_seconds=prefill,
            decode_seconds=decode,
            generated_tokens=run.tokens,
            batch_size=batch,
            forwards=run.forwards,
            bytes_moved=dict(self.counters.moved),
            peak_bytes=dict(self.counters.peak),
            memory=run.memory,
            routed_experts=self.counters.routed["experts"],
            routed_expert_bytes=self.counters.routed["bytes"],
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: FlexOffloadCache,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """One token step for the block ``input_ids`` (b, s); returns (b, s_keep, vocab) logits."""
        started = self._run.times.start()
        prefill = cache.get_seq_length() == 0
        policy = self._run.policy
        b, m = input_ids.shape[0], policy.micro_batch_size
        if prefill:
            self.store.check_files()
        if prefill and not self._run.generating:  # a forward of its own: check it fits first
            s = input_ids.shape[1]
            self.check_fits(b, s, 0, policy, logits_to_keep or s)
        bounds = [(i, min(i + m, b)) for i in range(0, b, m)]
        cache.allocate(tuple(e - s for s, e in bounds))
        # The rotary types that depend on the length see the whole block's, as stock does.
        span = int(position_ids.max()) + 1 if self.arch.needs_span else None
        host_ids = None
        if self.fetcher.streams(0):  # rows chosen on the host: one copy for the whole block
            host_ids = torch.stack((input_ids, position_ids.to(input_ids))).cpu()
        micro_batches = [
            MicroBatch(
                upload(input_ids[s:e], self.device),  # host inputs: no wait for the device
                upload(position_ids[s:e], self.device),
                None if key_mask is None else upload(key_mask[s:e], self.device),
                span,
                None if host_ids is None else host_ids[:, s:e],
            )
            for s, e in bounds
        ]
        activations = ActivationStore(
            num_stages=self.arch.layers + 1,
            num_micro_batches=len(bounds),
            split=policy.activations,
            device=self.device,
            directory=self.runtime_dir,
            counters=self.counters,
            mover=self.mover,
        )
        try:
            logits = run_block(
                arch=self.arch,
                fetcher=self.fetcher,
                cache=cache,
                activations=activations,
                mover=self.mover,
                micro_batches=micro_batches,
                logits_to_keep=logits_to_keep,
                routed_only=fetches_routed(
                    policy.expert_fetch,
                    self.arch.num_experts,
                    self.arch.experts_per_token,
                    input_ids.numel(),
                    self.arch.routing_probs,
                ),
            )
        finally:
            activations.close()
        cache.drain()
        self._run.times.stop(started, prefill)  # no device synchronize: events on CUDA
        self._run.forwards += 1
        self._run.tokens += b
        return logits

    def close(self) -> None:
        """Stop background threads, free memory tiers, remove temporary files."""
        self._cleanup()


def _cleanup(
    mover: Mover,
    fetcher: WeightFetcher,
    store: TierStore,
    owned_dir: str | None,
    runtime_dir: str,
    model_dir: ModelDirectory | None,
) -> None:
    mover.close()
    fetcher.close()
    store.release()
    if model_dir is not None:
        model_dir.close()
    shutil.rmtree(runtime_dir, ignore_errors=True)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
