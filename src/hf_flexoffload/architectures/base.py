"""What the offload core needs to know about a model architecture, and nothing more.

A model is a list of *stages*, each with its own weights: stage 0 embeds tokens, stages 1..L are
the decoder layers, stage L + 1 is the output head. The schedule, the placement, the weight
storage, the KV cache, compression and the cost model only ever see an ``Architecture``: its
sizes, the (local name, shape) of every stage's tensors with their checkpoint names, which head
weights are borrowed from another stage (tied embeddings), a few counts for the cost model, and
three functions of plain tensors (embed, decoder layer, head). An architecture module implements
this for one ``config.model_type`` (``opt.py``; the rotary decoder families are ``Decoder``
variants, see ``decoder.py``) and registers itself in ``architectures/__init__.py``.

Stage math receives a stage's weights as a dict of plain tensors keyed by local name
(``"self_attn.q_proj.weight"``) and never knows where they came from. Attention goes through an
``Attend`` callable supplied by the KV cache unit of (layer, micro-batch), so the architecture
never touches the cache either.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ..formats.compression import QuantizedTensor, TiledInt4
from ..formats.int4_tiled import KernelOperand
from .layers import StreamedRows

# Embedding and head matrices may stay quantized or be streamed from where they are stored (see
# Architecture.embeddings): only ``layers.lookup`` and ``layers.project`` read them. Decoder
# weights are plain tensors, or a ``KernelOperand`` in steps where the int4 kernel multiplies
# them: only ``layers.linear`` reads those.
Weights = dict[str, torch.Tensor | QuantizedTensor | TiledInt4 | KernelOperand | StreamedRows]
# attend(q, k_new, v_new, scale, softcap=None) -> attention output (b, s, H, d). q is
# (b, s, H, d); the new keys and values are (b, s, H_kv, d) with H a multiple of H_kv
# (grouped-query attention). The unit applies its layer's sliding window.
Attend = Callable[..., torch.Tensor]
# (local name, shape) of one stored tensor.
TensorList = list[tuple[str, tuple[int, ...]]]


class Architecture(ABC):
    """One model architecture's sizes, weight names and math.

    Concrete architectures are frozen dataclasses built by ``from_config`` from a transformers
    config; they provide the sizes below (as fields or properties) and implement the abstract
    methods.
    """

    model_type: ClassVar[str]
    # Local names of the weights that map tokens rather than transform hidden states;
    # ``Policy.compress_embeddings`` decides whether they are quantized. When they are, the math
    # receives them as ``QuantizedTensor`` (a lookup dequantizes only the rows it reads).
    embeddings: ClassVar[frozenset[str]]

    layers: int  # decoder layers
    hidden: int  # width of the hidden states
    heads: int  # query heads
    kv_heads: int  # heads the KV cache stores per token (fewer than ``heads`` with GQA)
    head_dim: int
    ffn: int  # MLP width
    vocab: int
    embed_dim: int  # width of the token embedding (and LM head) rows
    max_positions: int
    tied_head: bool  # the LM head reads the token embedding matrix

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> Architecture:
        """The architecture of a transformers config; a clear ValueError for what it cannot run."""

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return self.layers + 2

    @property
    def head_flops(self) -> int:
        """Matmul FLOPs per token of the head stage."""
        return 2 * self.vocab * self.embed_dim

    @property
    def largest_layer_tensor(self) -> int:
        """Elements of a decoder layer's largest tensor (a streamed matrix's chunk buffers hold a
        quarter of it: well within what staging a layer already costs)."""
        return max(math.prod(dims) for _, dims in self.stage_tensors()[1])

    @property
    def kv_windows(self) -> tuple[int | None, ...]:
        """Per decoder layer: the sliding window its attention sees (its KV cache keeps only
        that many positions), or None for full attention."""
        return (None,) * self.layers

    def kv_positions(self, total: float) -> float:
        """Positions the KV cache stores over all layers for one sequence of ``total``."""
        return sum(total if w is None else min(w, total) for w in self.kv_windows)

    @property
    def needs_span(self) -> bool:
        """Whether ``decoder_layer`` needs the forward's ``span`` (length-dependent rotary)."""
        return False

    # -- mixture of experts (a dense model has none) -------------------------------------------

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) routes tokens to experts: the schedule then
        runs its ``attention_half`` per micro-batch and its ``sparse_mlp`` once per block."""
        return False

    @property
    def num_experts(self) -> int:
        """Experts per sparse layer (0: a dense model)."""
        return 0

    @property
    def experts_per_token(self) -> int:
        """Experts each token is routed to (top-k)."""
        return 0

    def expert_of(self, local: str) -> int | None:
        """The expert a decoder layer's tensor belongs to (experts are placed and fetched as
        units), or None for a tensor every token uses."""
        return None

    @property
    def routing_probs(self) -> tuple[tuple[float, ...], ...]:
        """Per sparse layer, each expert's measured probability that a token routes to it (from
        ``with_expert_usage``); empty where routing is taken as uniform."""
        return ()

    def with_expert_usage(self, usage) -> Architecture:
        """This architecture with its experts placed most used first, per ``usage``
        (``ExpertUsage``)."""
        raise ValueError(
            f"expert_usage is for mixture-of-experts models; {self.model_type!r} has no experts."
        )

    def quantizable(self, local: str) -> bool:
        """Whether a decoder matrix may be stored compressed (a router stays exact)."""
        return True

    @property
    def workspace_width(self) -> int:
        """Elements per token of a decoder layer's intermediates alive at once (q, k, v,
        attention output, MLP inputs and outputs), for the cost model's workspace."""
        return 6 * self.hidden + 2 * self.ffn

    # -- weights -------------------------------------------------------------------------------

    @abstractmethod
    def stage_tensors(self) -> list[TensorList]:
        """(local name, shape) of every stored tensor, per stage, in the order the placement
        cuts through them: put the large matrices used last at the end so they are the ones
        that go to the slower tiers."""

    @abstractmethod
    def checkpoint_name(self, stage: int, local: str) -> str:
        """The tensor's name in a transformers checkpoint, with a leading ``model.`` dropped."""

    def renamed_tensors(self) -> dict[str, str]:
        """Checkpoint names other transformers releases save a tensor under -> the name
        ``checkpoint_name`` gives it (read by either)."""
        return {}

    def head_aliases(self) -> dict[str, tuple[int, str]]:
        """Head weights stored by another stage: local name -> (stage, local name there)."""
        return {"lm_head.weight": (0, "embed_tokens.weight")} if self.tied_head else {}

    # -- math ----------------------------------------------------------------------------------

    @abstractmethod
    def embed(
        self, w: Weights, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Stage 0: (b, s) token ids and positions -> (b, s, h) hidden states."""

    @abstractmethod
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
        """Decoder layer ``layer`` (0-based) on (b, s, h) hidden states; ``attend`` owns the KV
        cache. ``span``: the whole block's length (largest position + 1) where ``needs_span``."""

    @abstractmethod
    def head(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """The last stage: (b, s, h) hidden states -> (b, s, vocab) logits."""


def linear_specs(prefix: str, out_f: int, in_f: int, bias: bool) -> TensorList:
    """Tensors of an ``nn.Linear(in_f, out_f)`` named ``prefix``."""
    specs = [(f"{prefix}.weight", (out_f, in_f))]
    if bias:
        specs.append((f"{prefix}.bias", (out_f,)))
    return specs
