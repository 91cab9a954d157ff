"""What one ``generate`` call may use and the policy it runs under, for a loaded model.

The planning layer knows architectures and machines, not a loaded model: these methods of
``OffloadEngine`` ask it about one, adding back what the model already holds (its weights and
buffers are allocated when capacities are measured, and the memory model counts them again as
items), with the weights fixed where they were placed.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..architectures import Architecture
from ..config.counters import Counters
from ..config.policy import TIERS, Policy
from ..config.workload import Workload
from ..planning.budget import Capacities
from ..planning.cost_model import Estimate, estimate
from ..planning.hardware import HardwareProfile
from ..planning.memory_model import Footprint, footprint
from ..planning.optimizer import optimize
from ..storage.kv_codec import TokenCodec
from ..storage.tier_store import TierStore
from ..storage.transfer import shares_host_memory

logger = logging.getLogger(__name__)


class RunPlanning:
    """The planning half of ``OffloadEngine``, which sets the attributes below."""

    arch: Architecture
    policy: Policy
    store: TierStore
    counters: Counters
    device: torch.device
    dtype: torch.dtype
    storage: torch.dtype
    offload_dir: str
    max_memory: dict | None
    workload: Workload
    auto: bool
    _estimate: Estimate | None

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

    def kv_bytes(self, batch: int, length: int, policy: Policy | None = None) -> int:
        """KV-cache bytes of a block of ``batch`` sequences of ``length`` tokens, as stored."""
        token_shape = (2, batch, self.arch.kv_heads, self.arch.head_dim)
        token = TokenCodec(token_shape, self.dtype, (policy or self.policy).compress_cache)
        return int(self.arch.kv_positions(length)) * token.record_bytes

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
