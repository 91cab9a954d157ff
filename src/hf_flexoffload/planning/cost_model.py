"""Predicted time and memory of a policy: pure functions of (model, hardware, workload, policy).

The model follows *our* implementation, stage by stage (see schedule.py):

* each decoder layer's time is the max of four concurrent terms when ``overlap=True`` (the
  compute thread; the weight-read thread, which reads the disk share of the next layer and
  dequantizes it; the input-read thread, which reads KV history and hidden states from disk; the
  write thread), and their sum when not;
* compute is the layer's matmuls at the measured rate for its row count, attention at the
  measured KV-bytes rate (dequantizing compressed history first), plus a per-op overhead;
* the embedding and head matrices are streamed where they are stored (streamed.py): every
  forward pass reads the LM head's offloaded rows, a lookup only its rows;
* plain weights stored in a narrower dtype are converted as they are fetched;
* a forward pass adds a fixed per-step cost (transformers' generate loop and our set-up).

Every term is an ``Affine`` function of the nine placement fractions (weights, cache and
activations on device, host and disk; model_sizes.py), so the optimizer's LP and ``estimate``
share one model; the memory side is memory_model.py.
Bytes read from disk are priced at the page-cache rate when all the offloaded bytes fit in the RAM
nobody has claimed, and at the cold-disk rate otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architectures import Architecture
from ..config.policy import Policy
from ..config.workload import Workload
from .hardware import HardwareProfile
from .memory_model import Footprint, memory_items, memory_terms
from .model_sizes import (
    VARIABLES,
    Affine,
    ModelSizes,
    frac,
    fractions_of,
    is_offloaded,
    realized_fractions,
)

__all__ = [
    "VARIABLES",
    "Affine",
    "Estimate",
    "ModelSizes",
    "Rates",
    "estimate",
    "estimate_from_sizes",
    "fractions_of",
    "is_offloaded",
    "memory_terms",
    "realized_fractions",
]

# Small torch ops per decoder layer per micro-batch (norms, projections, reshapes, attention
# set-up, residuals) and per forward pass (generate's loop, slicing, stores): counted in ours.
OPS_PER_LAYER = 60
OPS_PER_STEP = 400
_PAGE_CACHE_MARGIN = 2 * 2**30


@dataclass(frozen=True)
class Rates:
    """The bandwidths a policy sees: disk rates depend on whether the page cache holds it all."""

    disk_read: float
    disk_write: float
    page_cached: bool

    @classmethod
    def of(
        cls, sizes: ModelSizes, profile: HardwareProfile, kv_total: int, direct_io: bool = False
    ) -> Rates:
        footprint = sizes.weights_stored + kv_total
        cached = footprint + _PAGE_CACHE_MARGIN <= profile.ram_available
        # Direct reads skip the page cache even when it could hold everything.
        direct = direct_io and profile.direct_overlap_penalty is not None
        if cached and not direct:
            return cls(profile.cached_disk_read, profile.cached_disk_read, True)
        return cls(profile.disk_read, profile.disk_write, False)


# -- time --------------------------------------------------------------------------------------


def layer_terms(
    sizes: ModelSizes,
    profile: HardwareProfile,
    rates: Rates,
    policy: Policy,
    *,
    tokens: int,
    context: float,
) -> dict[str, Affine]:
    """Seconds of one decoder layer for the whole block, per concurrent thread.

    Args:
        tokens: New tokens per sequence in this step (the prompt length in prefill, else 1).
        context: Cached tokens attended over, per sequence (0 in prefill).

    Returns:
        ``{"compute", "weights", "read", "write"}`` -> seconds as functions of the fractions.
    """
    m, k = policy.micro_batch_size, policy.num_micro_batches
    b, e = m * k, sizes.itemsize
    cuda = not profile.shared
    rows = m * tokens

    # Compressed weights in the int4 kernel's layout are multiplied as stored in steps of few
    # rows (no dequantizing pass; the kernel's own rate), else dequantized as they arrive.
    kernel = sizes.tiled_weights and rows <= kernel_rows(policy, profile)
    # A step fetching only routed experts reads (and dequantizes or converts) only the experts
    # hit, but only once the router has run: those reads wait for the layer's attention
    # instead of overlapping the previous layer (they are on the compute thread's path).
    routed = sizes.fetches_routed(b * tokens, policy.expert_fetch)
    share = sizes.read_share(b * tokens, policy.expert_fetch)
    offloaded = sizes.layer_stored * share
    weights = frac("weights", "disk") * (offloaded / rates.disk_read)
    if cuda:
        weights += frac("weights", "host", "disk") * (offloaded / profile.host_to_device)
    passed = 1 - sizes.expert_share * (1 - share)  # the share of the layer handed over
    if sizes.compressed_weights and not kernel:
        weights += sizes.layer_plain * passed / profile.dequantize_bytes
    # Plain weights stored narrower are converted in the same elementwise pass's time.
    weights += sizes.layer_converted * passed / profile.dequantize_bytes

    rate = profile.int4_rate(rows) if kernel else profile.matmul_rate(rows)
    dense_flops = sizes.layer_flops - sizes.routed_flops
    compute = Affine(const=b * tokens * dense_flops / rate)
    if sizes.experts:
        # Each expert hit runs once on all of its tokens across the block's micro-batches.
        per_expert = max(1, round(b * tokens * sizes.top_k / sizes.experts_hit(b * tokens)))
        expert_rate = profile.int4_rate(per_expert) if kernel else profile.matmul_rate(per_expert)
        compute += b * tokens * sizes.routed_flops / expert_rate
    compute += k * OPS_PER_LAYER * profile.op_seconds
    if context == 0:  # prefill: scores and weighted sum over the prompt (materialized mask)
        compute += 4 * b * tokens * tokens * sizes.attention_dim / profile.matmul_rate(rows)
    # A layer's mean history: windowed layers attend over (and store) at most their window.
    context = sizes.kv_positions(context) / sizes.layers
    history_plain = b * context * sizes.kv_token_plain  # bytes attended over
    history = b * context * sizes.kv_token  # bytes as stored
    host_attends = not cuda or policy.host_attention
    if cuda:
        away = frac("cache", "host", "disk")
        rate_away = profile.attention_bytes if host_attends else profile.device_attention_bytes
        compute += frac("cache", "device") * (history_plain / profile.device_attention_bytes)
        compute += away * (history_plain / rate_away)
    else:
        compute += history_plain / profile.attention_bytes
    if sizes.compressed_cache:
        compute += history_plain / profile.dequantize_bytes
        compute += history_plain / profile.host_to_device  # cat with the new token

    if routed:  # the routed experts' reads: after the router, before their matmuls
        compute, weights = compute + weights, Affine()

    hidden = b * tokens * sizes.hidden * e
    new_kv = b * tokens * sizes.kv_token
    read = frac("cache", "disk") * (history / rates.disk_read)
    read += frac("activations", "disk") * (hidden / rates.disk_read)
    write = frac("cache", "disk") * (new_kv / rates.disk_write)
    write += frac("activations", "disk") * (hidden / rates.disk_write)
    if cuda:
        moved = history if not host_attends else 2 * hidden  # history, or q and the output
        read += frac("cache", "host", "disk") * (moved / profile.host_to_device)
        read += frac("activations", "host", "disk") * (hidden / profile.host_to_device)
        write += frac("cache", "host", "disk") * (new_kv / profile.device_to_host)
        write += frac("activations", "host", "disk") * (hidden / profile.device_to_host)
    return {"compute": compute, "weights": weights, "read": read, "write": write}


def kernel_rows(policy: Policy, profile: HardwareProfile) -> int:
    """Rows per layer up to which the runtime multiplies tiled 4-bit weights by the int4
    kernel: the policy's pin, else the crossover measured in the profile."""
    if policy.int4_kernel_rows is not None:
        return policy.int4_kernel_rows if profile.int4_matmul_flops else 0
    return profile.int4_kernel_rows


def step_terms(
    sizes: ModelSizes,
    profile: HardwareProfile,
    rates: Rates,
    policy: Policy,
    *,
    tokens: int,
    context: float,
    first: bool,
) -> tuple[dict[str, Affine], Affine]:
    """One forward pass: the per-layer terms and the time outside the layers.

    Args:
        first: The model's first forward pass (kept for the callers' phases; the LM head is
            streamed from where it is stored in every pass).

    Returns:
        (per-layer terms as ``layer_terms``, seconds of the embedding, head and per-step
        overhead).
    """
    m, k = policy.micro_batch_size, policy.num_micro_batches
    b = m * k
    cuda = not profile.shared
    per_layer = layer_terms(sizes, profile, rates, policy, tokens=tokens, context=context)

    head = Affine(const=b * sizes.head_flops / profile.matmul_rate(m))
    if sizes.compressed_head or sizes.converts:
        # The head dequantizes or converts its matrix chunk by chunk, once for the block.
        head += sizes.head_plain / profile.dequantize_bytes
    logits = b * sizes.vocab * 4
    fixed = Affine(const=OPS_PER_STEP * profile.op_seconds + 4 * logits / profile.host_to_device)
    outside = fixed + head
    # Every step streams the LM head's offloaded rows once (the embedding reads a few rows).
    streamed = sizes.head_matrix_stored
    outside += frac("weights", "disk") * (streamed / rates.disk_read)
    if cuda:
        outside += frac("weights", "host", "disk") * (streamed / profile.host_to_device)
    return per_layer, outside


def combine(
    terms: dict[str, Affine], values: dict[str, float], overlap: bool, penalty: float
) -> float:
    """A layer's seconds: all threads in turn without overlap; with it, the slowest thread plus
    ``penalty`` times the rest (``penalty = 0``: perfect overlap)."""
    times = [t.at(values) for t in terms.values()]
    if not overlap:
        return sum(times)
    return (1 - penalty) * max(times) + penalty * sum(times)


# -- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """What the cost model predicts for one policy.

    Attributes:
        block_size: Sequences per block.
        prefill_seconds: The first forward pass (the prompt).
        decode_seconds: All later forward passes.
        tokens_per_second: Generated tokens / (prefill + decode), FlexGen's throughput.
        peak_bytes: Peak bytes per tier (device, host, disk).
        layer_seconds: One decode layer's terms (compute, weights, read, write).
        page_cached: Disk reads priced at the page-cache rate.
        memory: Where the peak bytes go, item by item (memory_model.py).
    """

    block_size: int
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    peak_bytes: dict[str, int]
    layer_seconds: dict[str, float]
    page_cached: bool
    memory: Footprint | None = None

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def bottleneck(self) -> str:
        return max(self.layer_seconds, key=self.layer_seconds.get)

    def to_dict(self) -> dict:
        return {
            "block_size": self.block_size,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "peak_bytes": dict(self.peak_bytes),
            "layer_seconds": dict(self.layer_seconds),
            "page_cached": self.page_cached,
            "memory": self.memory.to_dict() if self.memory else None,
        }


def estimate_from_sizes(
    sizes: ModelSizes,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
    values: dict[str, float],
) -> Estimate:
    """The estimate at given fraction ``values`` (realized or requested)."""
    s, n = workload.prompt_len, workload.gen_len
    b = policy.block_size
    items = memory_items(
        sizes, profile.shared, policy, workload, is_offloaded(profile.shared, values)
    )
    footprint = Footprint.of(items, values, profile.shared)
    kv_total = b * sizes.kv_positions(s + n) * sizes.kv_token
    rates = Rates.of(sizes, profile, kv_total, policy.direct_io)
    prefill_layer, prefill_rest = step_terms(
        sizes, profile, rates, policy, tokens=s, context=0, first=True
    )
    decode_layer, decode_rest = step_terms(
        sizes, profile, rates, policy, tokens=1, context=s + n / 2, first=False
    )
    penalty = profile.penalty_for(policy.direct_io)
    prefill = sizes.layers * combine(prefill_layer, values, policy.overlap, penalty)
    prefill += prefill_rest.at(values)
    decode_step = sizes.layers * combine(decode_layer, values, policy.overlap, penalty)
    decode_step += decode_rest.at(values)
    decode = (n - 1) * decode_step
    return Estimate(
        block_size=b,
        prefill_seconds=prefill,
        decode_seconds=decode,
        tokens_per_second=b * n / (prefill + decode),
        peak_bytes=footprint.per_tier,
        layer_seconds={name: t.at(values) for name, t in decode_layer.items()},
        page_cached=rates.page_cached,
        memory=footprint,
    )


def estimate(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
    *,
    storage: torch.dtype | None = None,
) -> Estimate:
    """Predict time and memory of running ``workload`` under ``policy``.

    Uses the fractions the runtime realizes (whole rows of weights, whole (layer, micro-batch)
    units of cache and activations), so peak bytes match what loading and generating will hold.

    Example:
        >>> est = estimate(arch, torch.float32, HardwareProfile.measure(), Workload(), policy)
        >>> est.tokens_per_second, est.peak_bytes["device"]
    """
    sizes = ModelSizes.of(arch, dtype, policy, storage)
    values = realized_fractions(arch, dtype, policy, storage)
    return estimate_from_sizes(sizes, profile, workload, policy, values)
