"""Mixture-of-experts decoders: the rotary decoder with a routed MLP, the expert as a unit.

A sparse layer replaces the MLP by a router (``gate``: hidden -> one logit per expert), ``E``
experts (each a gated MLP of width ``expert_ffn``) of which every token uses its ``top_k``, and
optionally a shared expert every token uses, scaled by a sigmoid gate (Qwen2-MoE). The math
follows transformers 5's default experts path (``grouped_mm``) step by step: softmax over the
router logits in fp32, top-k, renormalized where the family does, cast to the model's dtype
where the family does; each routed (token, slot) pair's expert output is scaled by its weight and
the ``top_k`` slots are summed per token.

Each expert's matrices are stored as the checkpoint stores them (the hub's per-expert names,
which ``save_pretrained`` writes), so an expert is a unit of placement: ``expert_of`` names the
expert a tensor belongs to, the placement never splits one between tiers, and the runtime can
fetch only the experts a block routes to. That is why a sparse layer runs in two halves:

* ``attention_half`` per micro-batch (attention, the residual, the MLP's input norm);
* ``sparse_mlp`` once over the whole block's tokens: the router runs first, then ``load`` is
  asked for the experts hit that are not already in the weights (the schedule reads only those)
  and each expert runs once on all of its tokens, across micro-batches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..config.expert_usage import ExpertUsage
from .base import Attend, TensorList, Weights, linear_specs
from .decoder import Decoder
from .layers import linear

# load(experts, tokens) starts gathering the weights of the experts hit (``tokens``: the routed
# (token, slot) pairs of each) and returns a function that waits for those the weights lacked:
# the math computes the experts it already holds in between.
LoadExperts = Callable[[list[int], list[int]], Callable[[], Weights]]
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class MoeNames:
    """Where a family keeps its sparse MLP inside a layer (after ``layers.N.``)."""

    block: str = "mlp"  # Mixtral: "block_sparse_moe"
    router: str = "gate"
    gate: str = "gate_proj"  # per expert; Mixtral: w1
    up: str = "up_proj"  # Mixtral: w3
    down: str = "down_proj"  # Mixtral: w2
    shared: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"


@dataclass(frozen=True, kw_only=True)
class MoeDecoder(Decoder):
    """A rotary decoder whose sparse layers route each token to ``top_k`` of ``experts``."""

    moe_names: ClassVar[MoeNames] = MoeNames()

    experts: int
    top_k: int
    expert_ffn: int
    norm_topk_prob: bool = True
    # Cast the routing weights to the hidden states' dtype (Qwen, OLMoE) or keep fp32 (Mixtral).
    weights_in_model_dtype: bool = True
    shared_ffn: int = 0  # the shared expert's width (Qwen2-MoE); 0: none
    sparse: tuple[bool, ...] = ()  # per layer; () = every layer is sparse
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to [-clip, clip]
    # From a calibration (``with_expert_usage``), per layer: the experts in placement order,
    # most used first, and each expert's probability that a token routes to it.
    expert_order: tuple[tuple[int, ...], ...] = ()
    routing: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        what = type(self).model_type
        if not 0 < self.top_k <= self.experts:
            raise ValueError(
                f"{what}: num_experts_per_tok={self.top_k} must be between 1 and the number of "
                f"experts ({self.experts})."
            )
        if self.sparse and len(self.sparse) != self.layers:
            raise ValueError(f"{what}: sparse needs one entry per layer.")

    # -- sizes ---------------------------------------------------------------------------------

    def is_sparse(self, layer: int) -> bool:
        return not self.sparse or self.sparse[layer]

    @property
    def num_experts(self) -> int:
        return self.experts

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    def expert_of(self, local: str) -> int | None:
        found = _EXPERT.search(f".{local}")
        return None if found is None else int(found.group(1))

    @property
    def routing_probs(self) -> tuple[tuple[float, ...], ...]:
        return tuple(p for p in self.routing if p)

    def with_expert_usage(self, usage: ExpertUsage) -> MoeDecoder:
        what = type(self).model_type
        layers = len(usage.counts)
        if layers != self.layers:
            raise ValueError(
                f"{what}: expert_usage counts {layers} layers, the model has {self.layers}: it "
                "comes from another model."
            )
        for layer, counts in enumerate(usage.counts):
            want = self.experts if self.is_sparse(layer) else 0
            if len(counts) != want:
                raise ValueError(
                    f"{what}: expert_usage has {len(counts)} experts for layer {layer}, the "
                    f"model {want}: it comes from another model."
                )
        order = tuple(usage.order(i) if c else () for i, c in enumerate(usage.counts))
        routing = tuple(
            usage.shares(i, self.top_k) if c else () for i, c in enumerate(usage.counts)
        )
        return replace(self, expert_order=order, routing=routing)

    def quantizable(self, local: str) -> bool:
        # Routers stay in full precision: a 4-bit router changes which experts tokens reach.
        m = self.moe_names
        return local not in (f"{m.block}.{m.router}.weight", f"{m.block}.{m.shared_gate}.weight")

    @property
    def largest_layer_tensor(self) -> int:
        return max(super().largest_layer_tensor, self.expert_ffn * self.hidden)

    # -- weights -------------------------------------------------------------------------------

    def stage_tensors(self) -> list[TensorList]:
        # A sparse layer's tensors: the dense ones without the MLP, then the router, the shared
        # expert, and the experts last (lowest index first, or most used first after a
        # calibration: the placement keeps the first ones resident and sends the last ones to
        # the slower tiers, a whole expert at a time).
        stages = super().stage_tensors()
        n, m, h = self.names, self.moe_names, self.hidden
        mlp = tuple(f"{x}." for x in (n.gate, n.up, n.gate_up, n.down))
        for layer in range(self.layers):
            if not self.is_sparse(layer):
                continue
            tensors = [t for t in stages[layer + 1] if not t[0].startswith(mlp)]
            tensors += linear_specs(f"{m.block}.{m.router}", self.experts, h, False)
            if self.shared_ffn:
                shared = f"{m.block}.{m.shared}"
                tensors += _gated_specs(shared, m, h, self.shared_ffn)
                tensors += linear_specs(f"{m.block}.{m.shared_gate}", 1, h, False)
            order = self.expert_order[layer] if self.expert_order else range(self.experts)
            for e in order:
                tensors += _gated_specs(f"{m.block}.experts.{e}", m, h, self.expert_ffn)
            stages[layer + 1] = tensors
        return stages

    # -- math ----------------------------------------------------------------------------------

    def _qkv(self, w: Weights, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = super()._qkv(w, h)
        if self.clip_qkv is not None:  # after the q/k norms, as OLMoE
            q, k, v = (t.clamp(min=-self.clip_qkv, max=self.clip_qkv) for t in (q, k, v))
        return q, k, v

    def attention_half(
        self,
        w: Weights,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attend: Attend,
        *,
        layer: int = 0,
        span: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sparse layer up to its MLP: (b, s, h) -> (residual, normed MLP input), both
        (b, s, h)."""
        n = self.names
        h = self._norm(w, n.pre_attn, x)
        x = x + self._attention(w, h, position_ids, attend, self.ropes[layer], span)
        return x, self._norm(w, n.pre_mlp, x)

    def decoder_layer(
        self,
        w: Weights,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attend: Attend,
        *,
        layer: int = 0,
        span: int | None = None,
    ) -> torch.Tensor:
        """One layer on one micro-batch, every expert in ``w`` (the schedule splits a sparse
        layer into ``attention_half`` per micro-batch and ``sparse_mlp`` per block)."""
        if not self.is_sparse(layer):
            return super().decoder_layer(w, x, position_ids, attend, layer=layer, span=span)
        x, h = self.attention_half(w, x, position_ids, attend, layer=layer, span=span)
        out = self.sparse_mlp(w, h.reshape(-1, self.hidden), _all_held)
        return x + out.view_as(x)

    def route(self, w: Weights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, h) tokens -> their experts' weights and indices, both (T, top_k)."""
        m = self.moe_names
        logits = linear(h, w[f"{m.block}.{m.router}.weight"])  # (T, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top /= top.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            top = top.to(logits.dtype)
        return top, chosen

    def sparse_mlp(self, w: Weights, h: torch.Tensor, load: LoadExperts) -> torch.Tensor:
        """The sparse MLP on (T, h) tokens -> (T, h), gathering the routed experts that ``w``
        lacks through ``load``."""
        m = self.moe_names
        top, chosen = self.route(w, h)  # (T, k) each
        counts = torch.bincount(chosen.flatten(), minlength=self.experts).tolist()
        hit = [e for e, n in enumerate(counts) if n]
        held = [e for e in hit if f"{m.block}.experts.{e}.{m.down}.weight" in w]
        missing = [e for e in hit if e not in held]
        wait = load(hit, [counts[e] for e in hit])
        # (T, k, h): each routed slot's scaled expert output, summed over the slots at the end.
        dtype = torch.result_type(h, top)
        slots = torch.zeros((*chosen.shape, h.shape[-1]), dtype=dtype, device=h.device)
        for e in held:
            self._expert(w, e, h, top, chosen, slots)
        if missing:
            gathered = wait()
            for e in missing:
                self._expert(gathered, e, h, top, chosen, slots)
        out = slots.sum(dim=1).to(h.dtype)
        if self.shared_ffn:
            shared = _gated(w, f"{m.block}.{m.shared}", m, self.activation, h)
            gate = linear(h, w[f"{m.block}.{m.shared_gate}.weight"])
            out = out + torch.sigmoid(gate) * shared
        return out

    def _expert(
        self,
        w: Weights,
        e: int,
        h: torch.Tensor,
        top: torch.Tensor,
        chosen: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Expert ``e`` on all of its tokens at once, written into their routed slots."""
        m = self.moe_names
        token, slot = torch.where(chosen == e)
        expert = partial(_gated, w, f"{m.block}.experts.{e}", m, self.activation)
        y = _in_bounded_shapes(expert, h[token])
        slots[token, slot] = y * top[token, slot, None]


# Routing gives each expert a different number of rows every step, and every distinct matmul
# shape is a kernel of its own that oneDNN (bf16 on CPU) compiles and keeps in its primitive cache
# (about 0.3 MB each, up to 1024 of them): memory no budget counts. An expert therefore runs on
# chunks of ROW_CHUNK rows, the last one zero-padded to a power of two: at most 9 row counts.
ROW_CHUNK = 256


def _in_bounded_shapes(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (row-wise) on (n, h) rows, run in chunks of bounded shapes; (n, out)."""
    outs = []
    for start in range(0, x.shape[0], ROW_CHUNK):
        part = x[start : start + ROW_CHUNK]
        rows = part.shape[0]
        size = ROW_CHUNK if rows == ROW_CHUNK else 1 << (rows - 1).bit_length()
        if size != rows:
            part = torch.cat([part, part.new_zeros(size - rows, part.shape[1])])
        outs.append(fn(part)[:rows])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _all_held(experts: list[int], tokens: list[int]) -> Callable[[], Weights]:
    """``LoadExperts`` when the weights hold every expert: nothing to gather."""
    return dict


def _gated_specs(prefix: str, m: MoeNames, hidden: int, ffn: int) -> TensorList:
    return (
        linear_specs(f"{prefix}.{m.gate}", ffn, hidden, False)
        + linear_specs(f"{prefix}.{m.up}", ffn, hidden, False)
        + linear_specs(f"{prefix}.{m.down}", hidden, ffn, False)
    )


def _gated(w: Weights, prefix: str, m: MoeNames, activation: str, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` of the expert at ``prefix``."""
    inner = ACT2FN[activation](linear(x, w[f"{prefix}.{m.gate}.weight"]))
    return linear(inner * linear(x, w[f"{prefix}.{m.up}.weight"]), w[f"{prefix}.{m.down}.weight"])
