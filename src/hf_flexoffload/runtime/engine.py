"""The offloaded model without the transformers API: placed weights plus block forward passes.

``OffloadEngine.load`` checks everything it can before writing a byte (checkpoint tensors, memory
per tier, the offload directory), then places the checkpoint stage by stage. ``forward`` runs one
token step of a block through the zig-zag schedule.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, replace

import torch

from ..storage.activations import ActivationStore
from ..architectures import Architecture, architecture_for
from ..planning.budget import Capacities, bound_heap_slack, return_freed_memory
from ..checkpoints.checkpoint import INDEX_FILE, SINGLE_FILE, check_tensors, open_checkpoint
from ..checkpoints.checkpoint_store import bytes_to_write, load_chunk_bytes, load_into_store
from ..checkpoints.compressed_checkpoint import SavedCompression, save_store
from ..planning.cost_model import Estimate, estimate
from ..storage.disk_file import check_writable
from ..planning.hardware import HardwareProfile
from ..planning.int4_kernel_choice import kernel_rows
from ..storage.kv_cache import TokenCodec
from ..planning.memory_model import MODEL_ITEMS, Footprint, footprint
from ..storage.offload_cache import FlexOffloadCache
from ..planning.optimizer import optimize
from ..storage.placement import PlacementReport
from ..planning.load_plan import checkpoint_compute_dtype, default_workload, plan_load
from ..config.policy import TIERS, Policy, Workload
from .schedule import MicroBatch, run_block
from ..config.counters import Counters
from .stats import GenerationStats
from ..storage.tier_store import TierStore, dtype_name
from ..storage.transfer import Mover, shares_host_memory, upload
from ..storage.weight_layout import (
    StageLayout,
    layout_for,
    placement_report,
    warn_if_inflated,
)
from ..storage.weights import WeightFetcher

logger = logging.getLogger(__name__)

# 2: QuantConfig.dim=None groups weights along their input channels (in 1: output channels),
# so an offload directory written by 1 holds other bytes for the same policy.
FORMAT_VERSION = 2


def _direct_io(policy: Policy, store: TierStore) -> bool:
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
    prefill: float = 0.0
    decode: float = 0.0
    forwards: int = 0
    tokens: int = 0
    memory: Footprint | None = None
    generating: bool = False


class OffloadEngine:
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
        self.runtime_dir = os.path.join(offload_dir, f"runtime-{os.getpid()}-{id(self):x}")
        self._run = _Run(policy)
        self._cleanup = weakref.finalize(
            self,
            _cleanup,
            self.mover,
            self.fetcher,
            store,
            offload_dir if owns_dir else None,
            self.runtime_dir,
        )

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
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
    ) -> OffloadEngine:
        arch = architecture_for(config)
        ckpt = open_checkpoint(path, use_safetensors)
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
        store = TierStore(
            device, os.path.join(directory, "weights"), counters, pin=policy.pin_weights
        )
        try:
            check_writable(store.directory, to_write)
            store.direct_io = _direct_io(policy, store)
            fingerprint = {
                "format": FORMAT_VERSION,
                "checkpoint": ckpt.fingerprint(),
                "dtype": dtype_name(dtype),
                "storage": dtype_name(storage),
                "weights": list(policy.weights.fractions),
                "compress_weights": policy.to_dict()["compress_weights"],
                "compress_embeddings": policy.compress_embeddings,
            }
            store.open_index(fingerprint)
            start = time.perf_counter()
            load_into_store(ckpt, layouts, store, load_chunk_bytes(arch.largest_layer_tensor))
            return_freed_memory()
            store.prune()
            if to_write:
                store.write_index(fingerprint)
            logger.info("Placed weights in %.1fs:\n%s", time.perf_counter() - start, report)
        except BaseException:
            store.release()
            if owns_dir:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(
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
        )

    # -- planning ------------------------------------------------------------------------------

    def profile(self) -> HardwareProfile:
        """This machine's profile with the capacities the model could use: what is free now plus
        what the model already holds, capped by ``max_memory``."""
        profile = HardwareProfile.measure(
            self.device,
            self.dtype,
            offload_dir=self.offload_dir,
            matrix=(self.arch.hidden, self.arch.ffn),
        )
        held = self._held()
        if profile.shared:
            ram = profile.host_memory + held["device"] + held["host"]
            free = {"device_memory": ram, "host_memory": ram}
        else:
            free = {
                "device_memory": profile.device_memory + held["device"],
                "host_memory": profile.host_memory + held["host"],
            }
        free["disk_space"] = profile.disk_space + held["disk"]
        return replace(profile, **free).with_caps(self.max_memory)

    @property
    def estimate(self) -> Estimate:
        """The cost model's prediction for the policy and workload the model was loaded with."""
        if self._estimate is None:
            self._estimate = estimate(
                self.arch,
                self.dtype,
                self.profile(),
                self.workload,
                self.policy,
                storage=self.storage,
            )
        return self._estimate

    def plan_run(self, batch: int, prompt_len: int, gen_len: int) -> Policy:
        """The policy for one ``generate`` call.

        A fixed policy is used as it is. With ``"auto"``, the weights stay where they were
        placed and micro-batching, KV cache and activations are chosen again for the real batch
        and lengths, within the memory the weights leave.
        """
        if not self.auto:
            return self.policy
        workload = Workload(prompt_len=prompt_len, gen_len=max(1, gen_len), batch_size=batch)
        policy, _ = optimize(
            self.arch, self.dtype, self.profile(), workload, fixed=self.policy, storage=self.storage
        )
        logger.info("generate: batch %d, policy %s", batch, policy.to_json(indent=None))
        return policy

    # -- generation ----------------------------------------------------------------------------

    def kv_bytes(self, batch: int, length: int, policy: Policy | None = None) -> int:
        """KV-cache bytes of a block of ``batch`` sequences of ``length`` tokens, as stored."""
        token_shape = (2, batch, self.arch.kv_heads, self.arch.head_dim)
        token = TokenCodec(token_shape, self.dtype, (policy or self.policy).compress_cache)
        return self.arch.layers * length * token.record_bytes

    def capacities(self) -> Capacities:
        """What the model may hold per tier: free now plus what it holds already (weights,
        buffers), capped by ``max_memory`` and the container's memory limit."""
        caps = Capacities.measure(self.device, self.offload_dir, None)
        held = self._held()
        if caps.shared:
            ram = caps.host + held["device"] + held["host"]
            free = {"device": ram, "host": ram, "disk": caps.disk + held["disk"]}
        else:
            free = {t: getattr(caps, t) + held[t] for t in TIERS}
        return Capacities(**free, shared=caps.shared).capped(self.max_memory)

    def _held(self) -> dict[str, int]:
        """Bytes the model holds per tier: its weights and the staging and chunk buffers kept
        from the last run. Capacities are measured with all of them allocated, and the memory
        model counts them again as items, so each is added back exactly once."""
        live = self.counters.live
        return {
            "device": live["device"],
            "host": live["host"],
            "disk": self.store.bytes_per_tier()["disk"],
        }

    def check_fits(
        self,
        batch: int,
        prompt_len: int,
        gen_len: int,
        policy: Policy | None = None,
        logits_tokens: int = 1,
    ) -> Footprint:
        """Raise ``InsufficientMemoryError`` before any cache or buffer is allocated if running
        ``batch`` sequences does not fit; returns the predicted footprint.

        Args:
            logits_tokens: Positions per sequence whose logits are returned (1 in generate).
        """
        policy = policy or self.policy
        m = min(policy.micro_batch_size, batch)
        run = replace(policy, micro_batch_size=m, num_micro_batches=-(-batch // m))
        workload = Workload(prompt_len=max(1, prompt_len), gen_len=max(1, gen_len))
        predicted, _ = footprint(
            self.arch,
            self.dtype,
            run,
            workload,
            shared=shares_host_memory(self.device),
            storage=self.storage,
            logits_tokens=logits_tokens,
        )
        what = f"A batch of {batch} sequences of {prompt_len} + {gen_len} tokens"
        self.capacities().check(predicted.per_tier, what, detail=predicted.table())
        return predicted

    def new_cache(self, capacity: int = 0, policy: Policy | None = None) -> FlexOffloadCache:
        policy = policy or self._run.policy
        return FlexOffloadCache(
            num_layers=self.arch.layers,
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
        self._run = _Run(policy or self.policy, memory=memory, generating=True)
        self.store.direct_io = _direct_io(self._run.policy, self.store)

    def end_run(self, batch: int) -> GenerationStats:
        run = self._run
        self._run = _Run(self.policy)
        return GenerationStats(
            policy=run.policy,
            prefill_seconds=run.prefill,
            decode_seconds=run.decode,
            generated_tokens=run.tokens,
            batch_size=batch,
            forwards=run.forwards,
            bytes_moved=dict(self.counters.moved),
            peak_bytes=dict(self.counters.peak),
            memory=run.memory,
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
        start = time.perf_counter()
        prefill = cache.get_seq_length() == 0
        policy = self._run.policy
        b, m = input_ids.shape[0], policy.micro_batch_size
        if prefill:
            self.store.check_borrowed()
        if prefill and not self._run.generating:  # a forward of its own: check it fits first
            s = input_ids.shape[1]
            self.check_fits(b, s, 0, policy, logits_to_keep or s)
        bounds = [(i, min(i + m, b)) for i in range(0, b, m)]
        cache.allocate(tuple(e - s for s, e in bounds))
        micro_batches = [
            MicroBatch(
                upload(input_ids[s:e], self.device),  # host inputs: no wait for the device
                upload(position_ids[s:e], self.device),
                None if key_mask is None else upload(key_mask[s:e], self.device),
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
            )
        finally:
            activations.close()
        cache.drain()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if prefill:
            self._run.prefill += elapsed
        else:
            self._run.decode += elapsed
        self._run.forwards += 1
        self._run.tokens += b
        return logits

    def close(self) -> None:
        """Stop background threads, free memory tiers, remove temporary files."""
        self._cleanup()


def _cleanup(
    mover: Mover, fetcher: WeightFetcher, store: TierStore, owned_dir: str | None, runtime_dir: str
) -> None:
    mover.close()
    fetcher.close()
    store.release()
    shutil.rmtree(runtime_dir, ignore_errors=True)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
