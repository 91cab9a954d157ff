"""The byte and FLOP counts of a model under a policy, and affine functions of its placement.

The cost model (time) and the memory model (bytes per tier) are both built from these: every
term is an ``Affine`` function of the nine placement fractions (weights, cache and activations on
device, host and disk), so the optimizer's LP and the estimates share one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..architectures import Architecture
from ..config.policy import TIERS, Policy, Split
from ..storage.kv_codec import TokenCodec
from ..storage.placement import assign_units
from ..storage.streamed import chunk_rows
from ..storage.weight_layout import layout_for, placement_report
from .expert_fetch import experts_hit, fetches_routed

KINDS = ("weights", "cache", "activations")
VARIABLES = tuple(f"{kind}.{tier}" for kind in KINDS for tier in TIERS)


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
    """The byte and FLOP counts of one model under one compression choice.

    Plain weights are stored in the storage dtype (``weight_layout.storage_dtype``) and computed in
    ``itemsize``-byte elements; the ``*_plain`` counts are in the compute dtype.
    """

    layers: int
    hidden: int
    ffn: int
    heads: int
    attention_dim: int  # query heads x head dim: the width attention scores are computed over
    workspace_width: int  # elements per token of a layer's live intermediates
    vocab: int
    embed_dim: int
    itemsize: int  # compute dtype
    layer_stored: int  # one decoder layer as stored (compressed when it is)
    layer_plain: int  # ... in the compute dtype
    layer_converted: int  # compute-dtype bytes of a layer's plain tensors stored in another dtype
    largest_stored: int  # stored bytes of a layer's largest matrix
    layer_flops: int  # matmul FLOPs per token of one decoder layer
    embed_stored: int  # stage 0
    head_stored: int  # the head stage's own tensors (a tied head borrows the embedding's copy)
    head_plain: int  # the LM-head matrix in the compute dtype
    head_matrix_stored: int  # the LM-head matrix as stored (the embedding's when tied)
    head_flops: int  # per token
    weights_stored: int  # every stage, the tied embedding once
    outer_kept: int  # outer stages' tensors gathered once and kept (norms, projections, and
    # embedding matrices stored quantized)
    stream_buffers: int  # chunk buffers of the streamed embedding and head matrices
    stream_refill: int  # ... and the second stored chunk a GPU refills while one is used
    largest_elements: int  # elements of the model's largest tensor
    largest_layer_elements: int  # ... of a decoder layer's largest tensor
    widest_row: int  # elements of the longest row of any tensor
    kv_token: int  # stored bytes of one token's keys and values, one layer, one sequence
    kv_token_plain: int
    compressed_weights: bool
    compressed_cache: bool
    compressed_head: bool
    # Every decoder matrix is stored in the int4 kernel's layout (int4_tiled).
    tiled_weights: bool = False
    # Per decoder layer, the sliding window its KV cache keeps (None: every position).
    kv_windows: tuple[int | None, ...] = ()
    # Mixture of experts (all 0 for a dense model): experts per sparse layer, experts per token,
    # one expert's MLP width, the share of a layer's stored bytes that are experts, and the
    # matmul FLOPs per token of its routed experts (part of ``layer_flops``).
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    expert_share: float = 0.0
    routed_flops: int = 0
    # Measured routing: per sparse layer, each expert's probability a token routes to it.
    routing: tuple[tuple[float, ...], ...] = ()

    def experts_hit(self, tokens: float) -> float:
        """Expected experts of a sparse layer that at least one of ``tokens`` routes to."""
        return experts_hit(self.experts, self.top_k, tokens, self.routing)

    def fetches_routed(self, tokens: float, mode: str) -> bool:
        """Whether a step over ``tokens`` fetches only routed experts (``expert_fetch``)."""
        return fetches_routed(mode, self.experts, self.top_k, tokens, self.routing)

    def read_share(self, tokens: float, mode: str) -> float:
        """The share of a layer's offloaded bytes a step over ``tokens`` tokens reads: all of
        them, unless it fetches only routed experts: then the experts hit (the placement sends
        experts, a sparse layer's last tensors, to the slower tiers first)."""
        if not self.fetches_routed(tokens, mode):
            return 1.0
        return self.experts_hit(tokens) / self.experts

    def kv_positions(self, total: float) -> float:
        """Positions the KV cache holds over all layers for one sequence of ``total``: a
        windowed layer holds at most its window."""
        if not self.kv_windows:
            return self.layers * total
        return sum(total if w is None else min(w, total) for w in self.kv_windows)

    @classmethod
    def of(
        cls,
        arch: Architecture,
        dtype: torch.dtype,
        policy: Policy,
        storage: torch.dtype | None = None,
    ) -> ModelSizes:
        storage = storage or dtype
        layouts = layout_for(arch, _sizing_policy(policy), dtype, storage)
        per_stage = placement_report(layouts, Split(device=1.0)).per_stage
        stage_tensors = arch.stage_tensors()
        # The largest decoder layer stands for all (a sparse one where dense ones are mixed in).
        big = max(range(1, arch.layers + 1), key=lambda j: per_stage[j]["device"])
        matrices = [
            math.prod(d)
            for local, d in stage_tensors[big]
            if len(d) == 2 and arch.expert_of(local) is None
        ]
        experts = arch.num_experts if any(arch.is_sparse(i) for i in range(arch.layers)) else 0
        expert_elements = sum(
            math.prod(d) for local, d in stage_tensors[big] if arch.expert_of(local) is not None
        )
        routed = 2 * arch.experts_per_token * expert_elements // experts if experts else 0
        expert_stored = sum(s.nbytes for s in layouts[big].specs if s.unit is not None)
        kv_width = arch.kv_heads * arch.head_dim
        codec = TokenCodec((2, 1, arch.kv_heads, arch.head_dim), dtype, policy.compress_cache)
        e = dtype.itemsize
        converted = sum(
            math.prod(spec.shape) * e
            for spec in layouts[big].specs
            if spec.name not in layouts[big].formats and storage != dtype
        )
        largest_plain = arch.largest_layer_tensor * e
        kept = 0
        for layout in (layouts[0], layouts[-1]):
            for spec in layout.specs:
                if spec.name in layout.formats:
                    kept += spec.nbytes if layout.local[spec.name] in arch.embeddings else 0
                elif layout.local[spec.name] not in arch.embeddings or len(spec.shape) != 2:
                    kept += math.prod(spec.shape) * e
        rows = chunk_rows(arch.vocab, arch.embed_dim * e, largest_plain // 4)
        stream = rows * arch.embed_dim * (storage.itemsize + (e if storage != dtype else 0))
        head_matrix = arch.vocab * arch.embed_dim
        head_fmt = next(
            (
                f
                for layout in layouts
                for n, f in layout.formats.items()
                if f.shape[0] == arch.vocab
            ),
            None,
        )
        return cls(
            layers=arch.layers,
            hidden=arch.hidden,
            ffn=arch.ffn,
            heads=arch.heads,
            attention_dim=arch.heads * arch.head_dim,
            workspace_width=arch.workspace_width,
            vocab=arch.vocab,
            embed_dim=arch.embed_dim,
            itemsize=e,
            layer_stored=per_stage[big]["device"],
            layer_plain=sum(math.prod(d) for _, d in stage_tensors[big]) * e,
            layer_converted=converted,
            largest_stored=max(s.nbytes for s in layouts[big].specs),
            layer_flops=2 * sum(matrices) + routed,
            embed_stored=per_stage[0]["device"],
            head_stored=per_stage[-1]["device"],
            head_plain=head_matrix * e,
            head_matrix_stored=head_fmt.nbytes if head_fmt else head_matrix * storage.itemsize,
            head_flops=arch.head_flops,
            weights_stored=sum(s["device"] for s in per_stage),
            outer_kept=kept,
            largest_elements=max(math.prod(d) for tensors in stage_tensors for _, d in tensors),
            largest_layer_elements=arch.largest_layer_tensor,
            widest_row=max(math.prod(d[1:]) for tensors in stage_tensors for _, d in tensors),
            # A quantized head dequantizes 4096 rows at a time (quantized_matrix.linear).
            stream_buffers=min(arch.vocab, 4096) * arch.embed_dim * e if head_fmt else stream,
            stream_refill=0 if head_fmt else rows * arch.embed_dim * storage.itemsize,
            kv_token=codec.record_bytes,
            kv_token_plain=2 * kv_width * e,
            compressed_weights=policy.compress_weights is not None,
            compressed_cache=policy.compress_cache is not None,
            compressed_head=policy.compress_weights is not None and policy.compress_embeddings,
            tiled_weights=bool(layouts[big].formats)
            and all(f.tiled for f in layouts[big].formats.values()),
            kv_windows=tuple(arch.kv_windows) if any(arch.kv_windows) else (),
            experts=experts,
            top_k=arch.experts_per_token if experts else 0,
            # A gated expert is three (f, h) matrices.
            expert_ffn=expert_elements // (3 * experts * arch.hidden) if experts else 0,
            expert_share=expert_stored / max(1, per_stage[big]["device"]),
            routed_flops=routed,
            routing=arch.routing_probs if experts else (),
        )

    @property
    def converts(self) -> bool:
        """Plain weights are stored in another dtype than they are computed in."""
        return self.layer_converted > 0


def _sizing_policy(policy: Policy) -> Policy:
    """``policy`` with every weight on the device: sizes do not depend on the split."""
    return Policy(
        compress_weights=policy.compress_weights, compress_embeddings=policy.compress_embeddings
    )


def realized_fractions(
    arch: Architecture, dtype: torch.dtype, policy: Policy, storage: torch.dtype | None = None
) -> dict[str, float]:
    """The fractions the runtime will realize (whole rows and whole units), not the requested."""
    layouts = layout_for(arch, policy, dtype, storage)
    weights = placement_report(layouts, policy.weights).realized
    values = {f"weights.{t}": weights[t] for t in TIERS}
    k = policy.num_micro_batches
    for kind, units in (("cache", arch.layers * k), ("activations", (arch.layers + 1) * k)):
        split = getattr(policy, kind)
        tiers = assign_units(units, split)
        for t in TIERS:
            values[f"{kind}.{t}"] = tiers.count(t) / units
    return values


def is_offloaded(shared: bool, values: dict[str, float]) -> bool:
    """Whether some weights live outside compute memory at these fractions (``shared``: a CPU
    machine, whose host RAM is compute memory)."""
    if shared:
        return values["weights.disk"] > 0
    return values["weights.device"] < 1
