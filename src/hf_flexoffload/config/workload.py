"""The workload ``offload_policy="auto"`` optimizes for: prompt and generation lengths, the
batch, and whether compression is allowed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .validation import fields_of, require


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the model will be asked to do: what ``offload_policy="auto"`` optimizes for.

    Args:
        prompt_len: Tokens per prompt (padded length of the block).
        gen_len: New tokens per sequence.
        batch_size: Sequences available to run together; ``None`` lets the optimizer pick the
            block size with the best throughput (up to ``max_batch_size``).
        max_batch_size: The largest block the optimizer considers when ``batch_size`` is None.
        allow_compression: Let the optimizer quantize weights and KV cache to 4 bits. Outputs
            then differ slightly from the uncompressed model's, so it is off by default.

    Example:
        >>> Workload(prompt_len=128, gen_len=32, allow_compression=True).batch_size is None
        True
    """

    prompt_len: int = 512
    gen_len: int = 32
    batch_size: int | None = None
    max_batch_size: int = 256
    allow_compression: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "max_batch_size"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"Workload.{name}",
                value,
                "must be an integer >= 1",
            )
        size = self.batch_size
        size_ok = size is None or (type(size) is int and size >= 1)
        require(size_ok, "Workload.batch_size", size, "must be None or an integer >= 1")
        compress = self.allow_compression
        require(isinstance(compress, bool), "Workload.allow_compression", compress, "True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**fields_of(cls, data))
