"""The zig-zag block schedule: one token step for a whole block, layer by layer.

For each stage ``j`` (embedding, decoder layers) the stage's weights are fetched once, then
every micro-batch ``k`` runs through it; the head stage runs once on the whole block's last
hidden states (b x h: small), so its matrix is read once per step. Visiting (j, k) in that
order, the schedule keeps one step ahead: while (j, k) computes, the weights of stage j + 1 and
the inputs (hidden states and KV history) of the next (j, k) in the order are being read, and
the outputs of (j, k - 1) are being written back. With ``overlap=False`` the same loop runs
every task inline.

::

    stage:      embed   layer 1   layer 2  ...  head
    mb 0          1 ──▶   4  ──▶    7            ...
    mb 1          2   ┘   5    ┘    8
    mb 2          3   ┘   6    ┘    9            (numbers: compute order)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..architectures import Architecture
from ..storage.activations import ActivationStore
from ..storage.offload_cache import FlexOffloadCache
from ..storage.transfer import Mover, Pending
from ..storage.weights import WeightFetcher


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a forward pass.

    Attributes:
        input_ids: (b, s) new tokens.
        position_ids: (b, s) their positions.
        key_mask: (b, S) padding mask over cached + new positions, or None for no padding.
        span: The whole block's length (largest position + 1) where the architecture's rotary
            embedding depends on it (``Architecture.needs_span``), else None.
        host_ids: (2, b, s) the token ids and positions on the host, for an embedding streamed
            from the host or disk (its rows are chosen on the host): copied once per forward
            for the whole block, so the lookup never waits for the device. None: use the ids.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    key_mask: torch.Tensor | None
    span: int | None = None
    host_ids: torch.Tensor | None = None


def run_block(
    *,
    arch: Architecture,
    fetcher: WeightFetcher,
    cache: FlexOffloadCache,
    activations: ActivationStore,
    mover: Mover,
    micro_batches: list[MicroBatch],
    logits_to_keep: int,
    routed_only: bool = True,
) -> torch.Tensor:
    """One forward pass of the block.

    A sparse (mixture-of-experts) layer runs its attention half per micro-batch as above, then
    its sparse MLP once over the whole block's tokens (``_sparse_block``): each expert is fetched
    at most once per step and runs once on all of its tokens.

    Args:
        routed_only: Fetch a sparse layer's experts only when the block routes to them (the
            rest of the layer is prefetched as usual); else with the layer, as dense weights.

    Returns:
        (b, s_keep, vocab) logits for the whole block, micro-batches concatenated in order.
    """
    num_stages = arch.num_stages
    head_stage = num_stages - 1
    order = [(j, k) for j in range(num_stages) for k in range(len(micro_batches))]

    def read_inputs(j: int, k: int):
        x = activations.get(j - 1, k) if j > 0 else None
        history = cache.units[j - 1][k].fetch() if 0 < j < head_stage else None
        return x, history

    def prefetch_inputs(j: int, k: int) -> Pending:
        # Inputs already where they are computed on need no thread hand-off.
        idle = (j == 0 or activations.resident(j - 1, k)) and (
            not 0 < j < head_stage or cache.units[j - 1][k].fetch_idle()
        )
        return mover.read(read_inputs, j, k, idle=idle)

    # Rows each layer computes in this pass: the int4 kernel is chosen per step by this count.
    rows = max(mb.input_ids.numel() for mb in micro_batches)

    def sparse(j: int) -> bool:
        return 0 < j < head_stage and arch.is_sparse(j - 1)

    def prefetch_weights(j: int) -> Pending:
        routed = routed_only and sparse(j)
        fetch = partial(fetcher.fetch, rows=rows, routed=routed)
        return mover.read_weights(fetch, j, idle=fetcher.idle(j, rows, routed))

    def load_experts(j: int, experts: list[int], tokens: list[int]):
        fetcher.counters.count_routed(j - 1, experts, tokens, fetcher.routed_bytes(j, experts))
        if not routed_only:
            return lambda: {}
        fetch = partial(fetcher.fetch_experts, rows=rows)
        idle = fetcher.experts_idle(j, experts, rows)
        return mover.read_weights(fetch, j, experts, idle=idle).wait

    held: list[tuple[torch.Tensor, torch.Tensor]] = []  # a sparse layer's attention halves

    weights: dict[int, Pending] = {0: prefetch_weights(0)}
    inputs = prefetch_inputs(*order[0])
    logits = []
    for i, (j, k) in enumerate(order):
        if k == 0:
            w = weights.pop(j).wait()
            if j + 1 < num_stages:
                weights[j + 1] = prefetch_weights(j + 1)
        x, history = inputs.wait()
        following = order[i + 1] if i + 1 < len(order) else None
        # Prefetch the next inputs now, unless they are this step's output (one micro-batch, or
        # a sparse layer's last micro-batch: its outputs come from the whole block's MLP).
        last = k == len(micro_batches) - 1
        early = following is not None and following != (j + 1, k) and not (sparse(j) and last)
        if early:
            inputs = prefetch_inputs(*following)
        mb = micro_batches[k]
        if j == 0:
            ids, positions = (
                mb.host_ids if mb.host_ids is not None else (mb.input_ids, mb.position_ids)
            )
            out = arch.embed(w, ids, positions)
        elif sparse(j):
            unit = cache.units[j - 1][k]
            attend = partial(unit.attend, history, key_mask=mb.key_mask, mover=mover)
            layer = j - 1
            held.append(
                arch.attention_half(w, x, mb.position_ids, attend, layer=layer, span=mb.span)
            )
            if not last:
                continue
            outs = _sparse_block(arch, w, held, partial(load_experts, j))
            held = []
            for kk, out in enumerate(outs):
                activations.put(j, kk, out)
            if following is not None:
                inputs = prefetch_inputs(*following)
            continue
        elif j < head_stage:
            unit = cache.units[j - 1][k]
            attend = partial(unit.attend, history, key_mask=mb.key_mask, mover=mover)
            out = arch.decoder_layer(w, x, mb.position_ids, attend, layer=j - 1, span=mb.span)
        else:
            # The head runs once over the whole block, after its last micro-batch: a streamed LM
            # head then reads its rows once per step, not once per micro-batch.
            logits.append(x if logits_to_keep == 0 else x[:, -logits_to_keep:])
            if k == len(micro_batches) - 1:
                return arch.head(w, torch.cat(logits) if len(logits) > 1 else logits[0])
            continue
        activations.put(j, k, out)
        if following is not None and not early:
            inputs = prefetch_inputs(*following)
    raise AssertionError("the order ends with the head stage")


def _sparse_block(
    arch: Architecture, w, held: list[tuple[torch.Tensor, torch.Tensor]], load
) -> list[torch.Tensor]:
    """A sparse layer's MLP over the whole block: the micro-batches' normed (b, s, h) inputs
    as one (T, h) batch of tokens, then each micro-batch's residual added back."""
    tokens = torch.cat([h.reshape(-1, h.shape[-1]) for _, h in held])  # (T, h)
    out = arch.sparse_mlp(w, tokens, load)
    sizes = [h.shape[0] * h.shape[1] for _, h in held]
    return [x + o.view_as(x) for (x, _), o in zip(held, out.split(sizes), strict=True)]
