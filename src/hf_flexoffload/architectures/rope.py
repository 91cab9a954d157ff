"""Rotary position embeddings as transformers computes them (``modeling_rope_utils``).

``Rope`` reads ``config.rope_parameters`` as transformers 5.x stores it (``rope_theta`` and
``rope_type`` inside it; older configs with ``rope_theta``/``rope_scaling`` attributes are
standardized by transformers on load). The default RoPE and Llama 3's frequency scaling are
implemented; other rope types raise a clear error instead of silently computing something else.
Inverse frequencies are computed in fp32 as transformers does, cos/sin in fp32 from fp32
positions, then cast to the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True, kw_only=True)
class Rope:
    """Rotary embedding parameters.

    Attributes:
        dim: Rotated dimensions per head (the head dimension).
        theta: The base wavelength (``rope_theta``).
        rope_type: ``"default"`` or ``"llama3"``.
        factor, low_freq_factor, high_freq_factor, original_max_positions: Llama 3 scaling.
    """

    dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    # Built per device on first use (not part of the value: equality and repr ignore it).
    _inv_freq: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported by hf_flexoffload; supported: "
                f"{list(SUPPORTED_ROPE_TYPES)}. Use a checkpoint whose config.rope_parameters has "
                "one of those, or run it with stock transformers."
            )
        if self.dim % 2 or self.dim <= 0:
            raise ValueError(f"Rotary dim={self.dim} must be a positive even number.")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
                f"low_freq_factor ({self.low_freq_factor})."
            )

    @classmethod
    def from_config(cls, config, dim: int) -> Rope:
        params = getattr(config, "rope_parameters", None) or {}
        if "full_attention" in params or "sliding_attention" in params:
            raise ValueError(
                "Per-layer-type rope_parameters are not supported by hf_flexoffload: every layer "
                "must use the same rotary embedding."
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "partial_rotary_factor != 1 is not supported by hf_flexoffload: rotary embeddings "
                "must cover the whole head dimension."
            )
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError("The config has no rope_theta (in config.rope_parameters).")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "llama3":
            return cls(dim=dim, theta=float(theta), rope_type=rope_type)
        return cls(
            dim=dim,
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(
                params.get("original_max_position_embeddings", config.max_position_embeddings)
            ),
        )

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(dim / 2,) fp32 inverse frequencies on ``device``, built once per device: every layer
        of every step asks, and building them there (or copying them there) each time is a few
        tiny kernels and, on CUDA, a host-to-device copy per call."""
        cached = self._inv_freq.get(device)
        if cached is None:
            cached = self._inv_freq[device] = self._build_inv_freq(device)
        return cached

    def _build_inv_freq(self, device: torch.device) -> torch.Tensor:
        steps = torch.arange(0, self.dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        inv_freq = 1.0 / (self.theta ** (steps / self.dim))
        if self.rope_type == "default":
            return inv_freq
        # Llama 3: long wavelengths are divided by ``factor``, short ones kept, the band between
        # interpolated smoothly (transformers' _compute_llama3_parameters, operation by operation).
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def cos_sin(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) positions -> cos, sin of shape (b, s, 1, dim) in ``dtype``, broadcastable over
        heads of (b, s, H, dim) queries and keys."""
        inv_freq = self.inv_freq(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (b, s, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, dim)
        return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, s, H, d) queries or keys by the (b, s, 1, d) angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
