"""Where the memory goes: one model of every byte a policy holds, by named item and tier.

The same items are used by ``offload_policy="auto"`` (the LP's capacity constraints), by the
load-time check of a fixed policy (before any file is written), by the check before each
``generate`` and before a ``forward`` called on its own, by the placement report and by
``generation_stats``. Each item is an ``Affine`` function of the placement fractions per tier
(model_sizes.py); ``Footprint`` is the model evaluated at one placement.

What is not an item: the interpreter, torch and transformers themselves (measured before the
model is loaded, so outside any budget), and allocator slack, bounded by ``RUNTIME_SLACK``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..architectures import Architecture
from ..checkpoints.checkpoint_store import load_chunk_bytes
from ..config.counters import human_bytes
from ..config.policy import TIERS, Policy
from ..config.workload import Workload
from ..storage.weights import BOUNCE_BYTES, READ_AHEAD
from .model_sizes import Affine, ModelSizes, frac, is_offloaded, realized_fractions

# What the process holds beyond the items (thread stacks, small tensors, freed temporaries the
# heap has not returned yet; see budget.bound_heap_slack): the allowance the memory tests grant
# over the predicted footprint. Measured: at most 12 MiB over, on the cases in docs/benchmarks.md.
RUNTIME_SLACK = 24 << 20


ITEMS = {
    "weights": "the policy's resident share of the weights, per tier",
    "kv cache": "keys and values of the block, all layers, prompt + new tokens (a window at most)",
    "hidden states": "hidden states between stages, per micro-batch",
    "weight staging": "two layers' gathered, converted or dequantized weights (computing, "
    "prefetching)",
    "embedding and head": "chunk buffers of the streamed embedding/LM-head matrices and the "
    "outer stages' small tensors",
    "workspace": "one micro-batch's layer intermediates, attention scores, history copies",
    "logits": "the block's logits and generate's float32 copies",
    "expert batches": "a sparse layer's whole-block tokens: residuals, normed inputs, router "
    "logits, routed outputs, one expert's intermediates",
    "read buffers": "pinned host buffers for disk reads (CUDA)",
}


def memory_items(
    sizes: ModelSizes,
    profile_shared: bool,
    policy: Policy,
    workload: Workload,
    offloaded: bool,
    logits_tokens: int = 1,
) -> dict[str, dict[str, Affine]]:
    """Peak bytes of every item per tier, as functions of the placement fractions.

    Args:
        profile_shared: The device is host memory (CPU-only machine).
        offloaded: Some weights are outside compute memory, so fetching gathers them.
        logits_tokens: Positions per sequence whose logits a forward returns (1 in generate).
    """
    m, k = policy.micro_batch_size, policy.num_micro_batches
    b, e = m * k, sizes.itemsize
    s, total = workload.prompt_len, workload.prompt_len + workload.gen_len
    kv = b * sizes.kv_positions(total) * sizes.kv_token
    hidden = (k + 1) * m * s * sizes.hidden * e
    items: dict[str, dict[str, Affine]] = {
        "weights": {t: sizes.weights_stored * frac("weights", t) for t in TIERS},
        "kv cache": {t: kv * frac("cache", t) for t in TIERS},
        "hidden states": {t: hidden * frac("activations", t) for t in TIERS},
    }
    # Two sets of layer buffers (one computing, one prefetching). A tensor with any rows
    # elsewhere is gathered whole; plain tensors stored in another dtype are converted, and
    # compressed ones dequantized, into buffers of the compute dtype.
    gathered = ("disk",) if profile_shared else ("host", "disk")
    staging = Affine()
    if offloaded and not sizes.converts:
        staging += 2 * sizes.layer_stored * frac("weights", *gathered)
        staging += 2 * sizes.largest_stored
    if sizes.converts:  # gathered and converted in one pass, through a bounce buffer
        staging += 2 * sizes.layer_converted + READ_AHEAD * min(BOUNCE_BYTES, sizes.largest_stored)
    if sizes.compressed_weights:
        staging += 2 * sizes.layer_plain
        # dequantize's unpacked codes (two uint8 copies) and their float copy, per tensor
        staging += sizes.largest_layer_elements * (2 + e)
    outer = Affine()
    if offloaded or sizes.converts or sizes.compressed_head:
        outer += sizes.outer_kept + sizes.stream_buffers
        outer += 0 if profile_shared else sizes.stream_refill  # ChunkCopies' second buffer
    if sizes.compressed_head:  # ... and per chunk of the quantized head
        outer += sizes.stream_buffers // e * (2 + e)
    workspace = m * s * sizes.workspace_width * e
    workspace += 2 * m * sizes.heads * s * s * 4
    workspace += 3 * m * total * sizes.kv_token_plain
    logits = 2 * b * logits_tokens * sizes.vocab * e + 2 * b * sizes.vocab * 4
    if sizes.experts:
        items["expert batches"] = _on("device", Affine(const=_expert_batches(sizes, b * s)))
    items["weight staging"] = _on("device", staging)
    items["embedding and head"] = _on("device", outer)
    items["workspace"] = _on("device", Affine(const=workspace))
    items["logits"] = _on("device", Affine(const=logits))
    if not profile_shared:
        items["read buffers"] = _on("host", sizes.layer_stored * frac("weights", "disk"))
    return items


def _expert_batches(sizes: ModelSizes, tokens: int) -> int:
    """Bytes a sparse layer holds over the block's ``tokens`` while its experts run: every
    micro-batch's residual and normed input, the router's logits, each routed slot's output
    (fp32 where routing weights are), and one expert's inputs and intermediates (routing is
    never exactly uniform: twice its fair share of tokens, at most all of them)."""
    e = sizes.itemsize
    held = 2 * tokens * sizes.hidden * e + tokens * sizes.experts * 4
    slots = tokens * sizes.top_k * sizes.hidden * 4
    rows = min(tokens, 2 * math.ceil(tokens * sizes.top_k / sizes.experts))
    expert = rows * ((sizes.hidden + 3 * sizes.expert_ffn) * e + sizes.hidden * 4)
    return held + slots + expert


def memory_terms(
    sizes: ModelSizes,
    profile_shared: bool,
    policy: Policy,
    workload: Workload,
    offloaded: bool,
    logits_tokens: int = 1,
) -> dict[str, Affine]:
    """Peak bytes per tier: the sum of ``memory_items``."""
    items = memory_items(sizes, profile_shared, policy, workload, offloaded, logits_tokens)
    return {t: sum((item[t] for item in items.values()), Affine()) for t in TIERS}


def load_bytes(
    sizes: ModelSizes, values: dict[str, float], quantizing: bool, shared: bool = True
) -> int:
    """Peak bytes in RAM while loading: the weights placed in RAM, two chunk buffers, and when
    quantizing, the largest tensor's quantized bytes plus the quantizer's working set."""
    memory = ("device", "host") if shared else ("host",)
    resident = sum(sizes.weights_stored * values[f"weights.{t}"] for t in memory)
    # Checkpoint rows and converted rows; a chunk is at least one row (<= 4 bytes an element).
    chunk = max(load_chunk_bytes(sizes.largest_layer_elements), 4 * sizes.widest_row)
    buffers = 2 * min(chunk, 4 * sizes.largest_elements)
    if quantizing:
        buffers += sizes.head_matrix_stored + 8 * chunk
    return int(resident + buffers)


@dataclass(frozen=True)
class Footprint:
    """The memory model at one placement: bytes per item and tier.

    Attributes:
        items: Item name -> tier -> bytes (only items that hold something).
        shared: Device and host are the same RAM (CPU-only machine).
    """

    items: dict[str, dict[str, int]]
    shared: bool

    @classmethod
    def of(cls, items: dict[str, dict[str, Affine]], values: dict[str, float], shared: bool):
        evaluated = {
            name: {t: int(a.at(values)) for t, a in tiers.items()} for name, tiers in items.items()
        }
        return cls({n: v for n, v in evaluated.items() if any(v.values())}, shared)

    @property
    def per_tier(self) -> dict[str, int]:
        return {t: sum(item.get(t, 0) for item in self.items.values()) for t in TIERS}

    @property
    def memory(self) -> int:
        """Bytes of RAM on a CPU machine (device + host), else of device memory."""
        tiers = self.per_tier
        return tiers["device"] + tiers["host"] if self.shared else tiers["device"]

    def only(self, names: tuple[str, ...]) -> Footprint:
        return Footprint({n: v for n, v in self.items.items() if n in names}, self.shared)

    def table(self) -> str:
        """A markdown table: one row per item, one column per tier."""
        head = "| item | device | host | disk | what |\n|---|---:|---:|---:|---|"
        rows = [
            f"| {name} | "
            + " | ".join(human_bytes(tiers.get(t, 0)) for t in TIERS)
            + f" | {ITEMS[name]} |"
            for name, tiers in self.items.items()
        ]
        total = self.per_tier
        rows.append("| **total** | " + " | ".join(human_bytes(total[t]) for t in TIERS) + " | |")
        return "\n".join([head, *rows])

    def to_dict(self) -> dict:
        return {"items": {n: dict(v) for n, v in self.items.items()}, "per_tier": self.per_tier}


def footprint(
    arch: Architecture,
    dtype: torch.dtype,
    policy: Policy,
    workload: Workload,
    *,
    shared: bool,
    storage: torch.dtype | None = None,
    logits_tokens: int = 1,
    quantizing: bool = False,
) -> tuple[Footprint, int]:
    """The memory model at the placement the runtime realizes for ``policy``.

    Args:
        quantizing: Loading quantizes the weights (they are not stored compressed yet).

    Returns:
        The footprint of running ``workload``, and the peak bytes of loading the weights.
    """
    sizes = ModelSizes.of(arch, dtype, policy, storage)
    values = realized_fractions(arch, dtype, policy, storage)
    offloaded = is_offloaded(shared, values)
    items = memory_items(sizes, shared, policy, workload, offloaded, logits_tokens)
    return Footprint.of(items, values, shared), load_bytes(sizes, values, quantizing, shared)


# Items that do not depend on the batch: what loading commits to before any generate.
MODEL_ITEMS = ("weights", "weight staging", "embedding and head", "read buffers")


def _on(tier: str, value: Affine) -> dict[str, Affine]:
    return {t: value if t == tier else Affine() for t in TIERS}
