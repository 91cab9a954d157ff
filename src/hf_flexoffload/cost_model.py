"""Predicted time and memory of a policy: pure functions of (model, hardware, workload, policy).

The model follows *our* implementation, stage by stage (see schedule.py):

* each decoder layer's time is the max of four concurrent terms when ``overlap=True`` (the
  compute thread; the weight-read thread, which reads the disk share of the next layer and
  dequantizes it; the input-read thread, which reads KV history and hidden states from disk; the
  write thread), and their sum when not;
* compute is the layer's matmuls at the measured rate for its row count, attention at the
  measured KV-bytes rate (dequantizing compressed history first), plus a per-op overhead;
* the embedding and head stages keep their gathered weights (weights.py), so only the first
  forward pass fetches them;
* a forward pass adds a fixed per-step cost (transformers' generate loop and our set-up).

Every term is an ``Affine`` function of the nine placement fractions (weights, cache and
activations on device, host and disk), so the optimizer's LP and ``estimate`` share one model.
Bytes read from disk are priced at the page-cache rate when all the offloaded bytes fit in the RAM
nobody has claimed, and at the cold-disk rate otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .architectures import Architecture
from .hardware import HardwareProfile
from .kv_cache import TokenCodec
from .placement import assign_units
from .policy import TIERS, Policy, Split, Workload
from .weights import layout_for, placement_report

KINDS = ("weights", "cache", "activations")
VARIABLES = tuple(f"{kind}.{tier}" for kind in KINDS for tier in TIERS)
# Small torch ops per decoder layer per micro-batch (norms, projections, reshapes, attention
# set-up, residuals) and per forward pass (generate's loop, slicing, stores): counted in ours.
OPS_PER_LAYER = 60
OPS_PER_STEP = 400
_PAGE_CACHE_MARGIN = 2 * 2**30


@dataclass(frozen=True)
class Affine:
    """``const + sum(coef[v] * v)`` over the placement fractions ``VARIABLES``."""

    coef: dict[str, float] = field(default_factory=dict)
    const: float = 0.0

    def __add__(self, other: Affine | float) -> Affine:
        if not isinstance(other, Affine):
            return Affine(dict(self.coef), self.const + other)
        coef = dict(self.coef)
        for name, c in other.coef.items():
            coef[name] = coef.get(name, 0.0) + c
        return Affine(coef, self.const + other.const)

    __radd__ = __add__

    def __mul__(self, scale: float) -> Affine:
        return Affine({n: c * scale for n, c in self.coef.items()}, self.const * scale)

    __rmul__ = __mul__

    def at(self, values: dict[str, float]) -> float:
        return self.const + sum(c * values[n] for n, c in self.coef.items())


def frac(kind: str, *tiers: str) -> Affine:
    """The sum of ``kind``'s fractions on ``tiers``."""
    return Affine({f"{kind}.{t}": 1.0 for t in tiers})


def fractions_of(policy: Policy) -> dict[str, float]:
    """The policy's requested fractions as values of ``VARIABLES``."""
    splits = {"weights": policy.weights, "cache": policy.cache, "activations": policy.activations}
    return {f"{k}.{t}": getattr(splits[k], t) for k in KINDS for t in TIERS}


@dataclass(frozen=True)
class ModelSizes:
    """The byte and FLOP counts of one model under one compression choice."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    attention_dim: int  # query heads x head dim: the width attention scores are computed over
    workspace_width: int  # elements per token of a layer's live intermediates
    vocab: int
    itemsize: int
    layer_stored: int  # one decoder layer as stored (compressed when it is)
    layer_plain: int  # ... in the compute dtype
    largest_stored: int  # stored bytes of a layer's largest matrix
    layer_flops: int  # matmul FLOPs per token of one decoder layer
    embed_stored: int  # stage 0
    head_stored: int  # the head stage's own tensors (a tied head borrows the embedding's copy)
    head_plain: int
    head_flops: int  # per token
    weights_stored: int  # every stage, the tied embedding once
    kv_token: int  # stored bytes of one token's keys and values, one layer, one sequence
    kv_token_plain: int
    compressed_weights: bool
    compressed_cache: bool
    compressed_head: bool

    @classmethod
    def of(cls, arch: Architecture, dtype: torch.dtype, policy: Policy) -> ModelSizes:
        layouts = layout_for(arch, _sizing_policy(policy), dtype)
        per_stage = placement_report(layouts, Split(device=1.0)).per_stage
        stage_tensors = arch.stage_tensors()
        matrices = [math.prod(d) for _, d in stage_tensors[1] if len(d) == 2]
        kv_width = arch.kv_heads * arch.head_dim
        codec = TokenCodec((2, 1, arch.kv_heads, arch.head_dim), dtype, policy.compress_cache)
        return cls(
            layers=arch.layers,
            hidden=arch.hidden,
            ffn=arch.ffn,
            heads=arch.heads,
            attention_dim=arch.heads * arch.head_dim,
            workspace_width=arch.workspace_width,
            vocab=arch.vocab,
            itemsize=dtype.itemsize,
            layer_stored=per_stage[1]["device"],
            layer_plain=sum(math.prod(d) for _, d in stage_tensors[1]) * dtype.itemsize,
            largest_stored=max(s.nbytes for s in layouts[1].specs),
            layer_flops=2 * sum(matrices),
            embed_stored=per_stage[0]["device"],
            head_stored=per_stage[-1]["device"],
            head_plain=arch.vocab * arch.embed_dim * dtype.itemsize,
            head_flops=arch.head_flops,
            weights_stored=sum(s["device"] for s in per_stage),
            kv_token=codec.record_bytes,
            kv_token_plain=2 * kv_width * dtype.itemsize,
            compressed_weights=policy.compress_weights is not None,
            compressed_cache=policy.compress_cache is not None,
            compressed_head=policy.compress_weights is not None and policy.compress_embeddings,
        )


def _sizing_policy(policy: Policy) -> Policy:
    """``policy`` with every weight on the device: sizes do not depend on the split."""
    return Policy(
        compress_weights=policy.compress_weights, compress_embeddings=policy.compress_embeddings
    )


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

    weights = frac("weights", "disk") * (sizes.layer_stored / rates.disk_read)
    if cuda:
        weights += frac("weights", "host", "disk") * (sizes.layer_stored / profile.host_to_device)
    if sizes.compressed_weights:
        weights += sizes.layer_plain / profile.dequantize_bytes

    compute = Affine(const=b * tokens * sizes.layer_flops / profile.matmul_rate(rows))
    compute += k * OPS_PER_LAYER * profile.op_seconds
    if context == 0:  # prefill: scores and weighted sum over the prompt (materialized mask)
        compute += 4 * b * tokens * tokens * sizes.attention_dim / profile.matmul_rate(rows)
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
        first: The model's first forward pass, which fetches the embedding and head stages'
            weights (later passes reuse the copies the fetcher keeps).

    Returns:
        (per-layer terms as ``layer_terms``, seconds of the embedding, head and per-step
        overhead).
    """
    m, k = policy.micro_batch_size, policy.num_micro_batches
    b = m * k
    cuda = not profile.shared
    per_layer = layer_terms(sizes, profile, rates, policy, tokens=tokens, context=context)

    head = Affine(const=b * sizes.head_flops / profile.matmul_rate(m))
    if sizes.compressed_head:  # the head dequantizes its matrix chunk by chunk, per micro-batch
        head += k * sizes.head_plain / profile.dequantize_bytes
    logits = b * sizes.vocab * 4
    fixed = Affine(const=OPS_PER_STEP * profile.op_seconds + 4 * logits / profile.host_to_device)
    outside = fixed + head
    if first:
        outer = sizes.embed_stored + sizes.head_stored
        outside += frac("weights", "disk") * (outer / rates.disk_read)
        if cuda:
            outside += frac("weights", "host", "disk") * (outer / profile.host_to_device)
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


# -- memory ------------------------------------------------------------------------------------


def memory_terms(
    sizes: ModelSizes,
    profile: HardwareProfile,
    policy: Policy,
    workload: Workload,
    offloaded: bool,
) -> dict[str, Affine]:
    """Peak bytes per tier: weights, KV cache, hidden states, staging buffers and workspace.

    Args:
        offloaded: Some weights are outside compute memory, so fetching gathers them into
            staging buffers (a tensor with any rows elsewhere is gathered whole).
    """
    m, k = policy.micro_batch_size, policy.num_micro_batches
    b, e = m * k, sizes.itemsize
    s, total = workload.prompt_len, workload.prompt_len + workload.gen_len
    cuda = not profile.shared
    kv = sizes.layers * b * total * sizes.kv_token
    hidden = (k + 1) * m * s * sizes.hidden * e
    mem = {t: sizes.weights_stored * frac("weights", t) for t in TIERS}
    for t in TIERS:
        mem[t] += kv * frac("cache", t) + hidden * frac("activations", t)

    # Two sets of layer buffers (one computing, one prefetching) hold gathered and dequantized
    # weights; the embedding and head stages keep their gathered tensors whole.
    gathered = ("host", "disk") if cuda else ("disk",)
    staging = Affine()
    if offloaded:
        staging = 2 * sizes.layer_stored * frac("weights", *gathered)
        staging += 2 * sizes.largest_stored  # tensors cut by the split are gathered whole
        staging += sizes.embed_stored + sizes.head_stored
    if sizes.compressed_weights:
        staging += 2 * sizes.layer_plain
    # Prefill workspace of one micro-batch (q, k, v, attention output, fc1 in and out, masks and
    # scores), the history copies of decode, and the block's logits as generate keeps them.
    workspace = m * s * sizes.workspace_width * e
    workspace += 2 * m * sizes.heads * s * s * 4
    workspace += 3 * m * total * sizes.kv_token_plain
    workspace += 3 * b * sizes.vocab * 4
    mem["device"] += staging + workspace
    if cuda:  # pinned buffers for the disk reads of one layer
        mem["host"] += sizes.layer_stored * frac("weights", "disk")
    return mem


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
    """

    block_size: int
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    peak_bytes: dict[str, int]
    layer_seconds: dict[str, float]
    page_cached: bool

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
        }


def realized_fractions(arch: Architecture, dtype: torch.dtype, policy: Policy) -> dict[str, float]:
    """The fractions the runtime will realize (whole rows and whole units), not the requested."""
    layouts = layout_for(arch, policy, dtype)
    weights = placement_report(layouts, policy.weights).realized
    values = {f"weights.{t}": weights[t] for t in TIERS}
    k = policy.num_micro_batches
    for kind, units in (("cache", arch.layers * k), ("activations", (arch.layers + 1) * k)):
        split = getattr(policy, kind)
        tiers = assign_units(units, split)
        for t in TIERS:
            values[f"{kind}.{t}"] = tiers.count(t) / units
    return values


def is_offloaded(profile: HardwareProfile, values: dict[str, float]) -> bool:
    """Whether some weights live outside compute memory at these fractions."""
    if profile.shared:
        return values["weights.disk"] > 0
    return values["weights.device"] < 1


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
    mem = memory_terms(sizes, profile, policy, workload, is_offloaded(profile, values))
    kv_total = sizes.layers * b * (s + n) * sizes.kv_token
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
        peak_bytes={t: int(mem[t].at(values)) for t in TIERS},
        layer_seconds={name: t.at(values) for name, t in decode_layer.items()},
        page_cached=rates.page_cached,
    )


def estimate(
    arch: Architecture,
    dtype: torch.dtype,
    profile: HardwareProfile,
    workload: Workload,
    policy: Policy,
) -> Estimate:
    """Predict time and memory of running ``workload`` under ``policy``.

    Uses the fractions the runtime realizes (whole rows of weights, whole (layer, micro-batch)
    units of cache and activations), so peak bytes match what loading and generating will hold.

    Example:
        >>> est = estimate(arch, torch.float32, HardwareProfile.measure(), Workload(), policy)
        >>> est.tokens_per_second, est.peak_bytes["device"]
    """
    sizes = ModelSizes.of(arch, dtype, policy)
    values = realized_fractions(arch, dtype, policy)
    return estimate_from_sizes(sizes, profile, workload, policy, values)
