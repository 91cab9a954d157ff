"""Rotary position embeddings as transformers computes them.

``Rope`` reads ``config.rope_parameters`` as transformers 5.x stores it (``rope_theta``,
``rope_type`` and the type's own keys inside it; per layer type for Gemma 3's local and global
layers). The inverse frequencies of every scaled type come from transformers' own
``ROPE_INIT_FUNCTIONS`` (the functions its models call), so they match stock bit for bit on
every release; the default type is the plain formula, as each model's own rotary class computes
it. cos/sin are computed in fp32 from fp32 positions, multiplied by the type's attention factor
(YaRN, LongRoPE), then cast to the compute dtype.

Two types depend on how long the sequence is, as transformers' ``dynamic_rope_update`` does it:

* ``longrope`` uses its long factors when the forward's longest position is past
  ``original_max_position_embeddings``, its short ones otherwise;
* ``dynamic`` (NTK) recomputes the frequencies for the forward's length past
  ``max_position_embeddings``. transformers keeps the longest length a model has seen across
  calls (a stateful cache); here each forward uses its own block's length, which is the same
  within one ``generate`` call and for any call whose sequences fit ``max_position_embeddings``.

Both need the whole block's length (``span``: its largest position + 1), not one micro-batch's.
Partial rotary (GPT-NeoX's ``rotary_pct``, Phi-3's ``partial_rotary_factor``) rotates the first
``dim`` dimensions of each head and passes the rest through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# The types whose frequencies depend on the sequence's length.
LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True, kw_only=True)
class Rope:
    """Rotary embedding parameters.

    Attributes:
        dim: Rotated dimensions per head (less than the head dimension with partial rotary).
        theta: The base wavelength (``rope_theta``).
        rope_type: One of ``SUPPORTED_ROPE_TYPES``.
        parameters: The type's other ``rope_parameters`` (sorted (key, value) pairs), part of
            the value so two ropes compare equal only when they rotate alike.
        layer_type: The key of per-layer-type ``rope_parameters`` (Gemma 3), or None.
        switch_length: Lengths above it use the long frequencies (``longrope``: the original
            max positions; ``dynamic``: ``max_position_embeddings``).
        config: The transformers config the scaled types' frequencies are computed from (not
            part of the value).
    """

    dim: int
    theta: float
    rope_type: str = "default"
    parameters: tuple[tuple[str, Any], ...] = ()
    layer_type: str | None = None
    switch_length: int = 0
    config: Any = field(default=None, compare=False, repr=False)
    # Built per (device, variant) on first use (not part of the value).
    _inv_freq: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported by hf_flexoffload; supported: "
                f"{list(SUPPORTED_ROPE_TYPES)}. Use a checkpoint whose config.rope_parameters has "
                "one of those, or run it with stock transformers."
            )
        if self.dim % 2 or self.dim <= 0:
            raise ValueError(f"Rotary dim={self.dim} must be a positive even number.")
        if self.rope_type != "default" and self.config is None:
            raise ValueError(f"rope_type={self.rope_type!r} needs the model's config.")

    @classmethod
    def from_config(
        cls, config, head_dim: int, layer_type: str | None = None, partial: bool = False
    ) -> Rope:
        """The rope of ``config`` (of ``layer_type``'s layers when given), refused clearly when
        transformers would compute something this class does not. ``partial``: the family
        rotates only ``partial_rotary_factor`` of each head (GPT-NeoX, Phi-3); the others'
        transformers code ignores the factor, and so does this."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        if layer_type is not None:
            params = dict(params[layer_type])
        elif any(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                "Per-layer-type rope_parameters are only supported for model types that have "
                "layer types (gemma3_text)."
            )
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError("The config has no rope_theta (in config.rope_parameters).")
        rope_type = params.get("rope_type", params.get("type", "default"))
        factor = float(params.get("partial_rotary_factor", 1.0)) if partial else 1.0
        dim = int(head_dim * factor)
        switch = 0
        if rope_type == "longrope":
            switch = int(
                params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", 0)
            )
        elif rope_type == "dynamic":
            switch = int(config.max_position_embeddings)
        other = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in params.items()
            if k not in ("rope_theta", "rope_type", "type")
        }
        return cls(
            dim=dim,
            theta=float(theta),
            rope_type=rope_type,
            parameters=tuple(sorted(other.items())),
            layer_type=layer_type,
            switch_length=switch,
            config=config if rope_type != "default" else None,
        )

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies depend on the forward's length (``cos_sin`` needs ``span``)."""
        return self.rope_type in LENGTH_DEPENDENT

    def inv_freq(self, device: torch.device, span: int | None = None) -> torch.Tensor:
        """(dim / 2,) fp32 inverse frequencies on ``device`` for a forward of ``span``
        positions, built once per device (and length variant): every layer of every step asks,
        and building them there (or copying them there) each time is a few tiny kernels and, on
        CUDA, a host-to-device copy per call."""
        return self._frequencies(device, span)[0]

    def _variant(self, span: int | None) -> int | str:
        if not self.depends_on_length or span is None or span <= self.switch_length:
            return "base"
        return "long" if self.rope_type == "longrope" else span

    def _frequencies(self, device: torch.device, span: int | None) -> tuple[torch.Tensor, float]:
        key = (device, self._variant(span))
        cached = self._inv_freq.get(key)
        if cached is None:
            if len(self._inv_freq) > 16:  # dynamic lengths grow every step: keep a few
                self._inv_freq.clear()
            cached = self._inv_freq[key] = self._build_inv_freq(device, key[1])
        return cached

    def _build_inv_freq(self, device: torch.device, variant: int | str = "base"):
        if self.rope_type == "default":
            steps = torch.arange(0, self.dim, 2, dtype=torch.int64).to(device=device)
            return 1.0 / (self.theta ** (steps.float() / self.dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        compute = ROPE_INIT_FUNCTIONS[self.rope_type]
        kwargs = {} if self.layer_type is None else {"layer_type": self.layer_type}
        inv_freq, factor = compute(self.config, device, **kwargs)
        if variant == "long":  # as transformers' longrope_frequency_update asks for them
            inv_freq, _ = compute(self.config, device, seq_len=self.switch_length + 1, **kwargs)
        elif isinstance(variant, int):  # dynamic NTK at this length (a tensor, as stock passes)
            inv_freq, factor = compute(self.config, device, seq_len=torch.tensor(variant), **kwargs)
        return inv_freq.to(device=device, dtype=torch.float), float(factor)

    def cos_sin(
        self, position_ids: torch.Tensor, dtype: torch.dtype, span: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) positions -> cos, sin of shape (b, s, 1, dim) in ``dtype``, broadcastable over
        heads of (b, s, H, head_dim) queries and keys.

        Args:
            span: The whole forward's length (largest position + 1) for the length-dependent
                types; ignored by the others.
        """
        inv_freq, factor = self._frequencies(position_ids.device, span)
        freqs = position_ids[..., None].float() * inv_freq  # (b, s, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, dim)
        cos, sin = emb.cos(), emb.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, s, H, d) queries or keys by the (b, s, 1, r) angles: the first ``r``
    dimensions of each head (all of them unless the rotary is partial)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        rotated = apply_rotary(x[..., :r], cos, sin)
        return torch.cat((rotated, x[..., r:]), dim=-1)
    half = r // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
