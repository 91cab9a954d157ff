"""The offload policy: how a model's bytes are spread over device, host and disk.

A leaf module: frozen, keyword-only dataclasses validated on construction, with a JSON round-trip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .validation import fields_of as _fields_of
from .validation import require as _require

TIERS = ("device", "host", "disk")
EXPERT_FETCH = ("auto", "routed", "all")  # Policy.expert_fetch
ROUNDINGS = ("minmax", "search")  # QuantConfig.rounding


@dataclass(frozen=True, kw_only=True)
class Split:
    """Fractions of one kind of data (weights, KV cache or activations) per tier.

    Args:
        device: Fraction on the compute device (GPU memory; on a CPU-only machine, RAM).
        host: Fraction in host RAM (weights pinned on CUDA unless ``Policy.pin_weights`` is
            off; the KV cache is pinned at its size on CUDA, so its uploads are asynchronous).
        disk: Fraction in files under the offload directory.

    Fields default to 0 and must sum to 1.

    Example:
        >>> Split(device=0.2, host=0.5, disk=0.3).fractions
        (0.2, 0.5, 0.3)
    """

    device: float = 0.0
    host: float = 0.0
    disk: float = 0.0

    def __post_init__(self) -> None:
        for name in TIERS:
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"Split.{name}",
                value,
                "a fraction must be a number between 0 and 1",
            )
            _require(0.0 <= value <= 1.0, f"Split.{name}", value, "must be between 0 and 1")
        total = self.device + self.host + self.disk
        _require(
            math.isclose(total, 1.0, abs_tol=1e-6),
            "Split",
            self,
            f"device + host + disk must sum to 1 (they sum to {total:.6g})",
        )

    @property
    def fractions(self) -> tuple[float, float, float]:
        """The (device, host, disk) fractions in tier order."""
        return (self.device, self.host, self.disk)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Split:
        _require(isinstance(data, dict), "Split", data, f"give a dict with keys {list(TIERS)}")
        unknown = set(data) - set(TIERS)
        _require(not unknown, "Split", sorted(unknown), f"allowed keys are {list(TIERS)}")
        return cls(**data)


def _all_on_device() -> Split:
    return Split(device=1.0)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Group-wise asymmetric quantization settings: FlexGen's, with input-channel groups of 32
    and a searched rounding by default (see docs/compression.md for the measurements).

    Args:
        bits: Bits per code, 4 or 8.
        group_size: Elements sharing one (scale, min) pair; positive and even.
        dim: The dimension along which groups are formed. ``None`` (the default) picks the last
            dimension: the input channels (dim 1) of a weight matrix, the head dimension of the
            KV cache (the only choice for the cache). ``dim=0`` groups a weight's output
            channels, as FlexGen does.
        rounding: How each group's scale and minimum are chosen (the stored format is the same):
            ``"minmax"`` spans the group's range, as FlexGen; ``"search"`` tries a few
            shrinkings of that range and keeps the one with the least squared error (never more
            than min–max's). ``None`` (the default) picks ``"search"`` for weights, quantized
            once at load, and ``"minmax"`` for the KV cache, quantized token by token at run
            time.

    Example:
        >>> QuantConfig()
        QuantConfig(bits=4, group_size=32, dim=None, rounding=None)
    """

    bits: int = 4
    group_size: int = 32
    dim: int | None = None
    rounding: str | None = None

    def __post_init__(self) -> None:
        bits_ok = type(self.bits) is int and self.bits in (4, 8)
        _require(bits_ok, "QuantConfig.bits", self.bits, "allowed values are 4 and 8")
        _require(
            type(self.group_size) is int and self.group_size > 0 and self.group_size % 2 == 0,
            "QuantConfig.group_size",
            self.group_size,
            "must be a positive even integer",
        )
        _require(
            self.dim is None or (isinstance(self.dim, int) and not isinstance(self.dim, bool)),
            "QuantConfig.dim",
            self.dim,
            "must be None or an integer dimension",
        )
        _require(
            self.rounding in (None, *ROUNDINGS),
            "QuantConfig.rounding",
            self.rounding,
            f"allowed values are None, {', '.join(repr(r) for r in ROUNDINGS)}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return cls(**_fields_of(cls, data))

    def resolved(self, rounding: str) -> QuantConfig:
        """This config with ``rounding`` filled in where it is None."""
        return self if self.rounding is not None else replace(self, rounding=rounding)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How to run one model: micro-batching, placement of every byte, and runtime options.

    Args:
        micro_batch_size: Sequences computed together per layer (FlexGen's ``gpu_batch_size``).
        num_micro_batches: Micro-batches per block (FlexGen's ``num_gpu_batches``). The block the
            policy was planned for is ``micro_batch_size * num_micro_batches`` sequences; it is
            the recommended ``batch_size`` for pipelines, but ``generate`` accepts any batch.
        weights: Split of the weight bytes of every layer over the tiers.
        cache: Split of the KV cache over the tiers, by (layer, micro-batch) unit.
        activations: Split of the hidden states between layers, by (layer, micro-batch) unit.
        overlap: Prefetch the next weights/cache and write back results while computing.
        host_attention: When a KV-cache unit lives on the host, compute decode attention there
            and move only the query and the attention output.
        compress_weights: Group-quantize weights (``None`` = keep the compute dtype).
        compress_cache: Group-quantize the KV cache (``None`` = keep the compute dtype); its
            groups run along the head dimension, with min-max rounding unless ``rounding``
            says otherwise.
        compress_embeddings: With ``compress_weights``, also quantize the token and position
            embeddings and the LM head (FlexGen does). ``False`` (the default) keeps them in the
            compute dtype: on SmolLM2-135M, 4-bit embeddings cost ~6% perplexity where 4-bit
            decoder matrices cost under 1% (docs/quality.md), for a few percent of a large
            model's bytes. 1-D weights (biases, layer norms) are never quantized.
        direct_io: Read disk-tier weights with ``O_DIRECT``, bypassing the page cache: disk
            reads then take the disk's time every step but no CPU time, so they overlap with
            compute even on few cores, and the weights do not crowd the page cache. Worth it
            when the disk tier does not fit in free RAM anyway. Falls back to cached reads
            (with a warning) where the filesystem has no ``O_DIRECT`` (e.g. tmpfs).
        pin_weights: On CUDA, page-lock the host tier's weights (exactly their size), so their
            copies to the device run asynchronously at full link speed (FlexGen's
            ``--pin-weight``). Turn off where page-locked memory is limited (``ulimit -l``,
            containers); copies are then synchronous. No effect on CPU.
        int4_kernel_rows: 4-bit weights stored in the CPU int4 kernel's layout (input-feature
            groups of 32, 64, 128 or 256; see ``int4_tiled``) are multiplied by that kernel,
            reading their packed bytes as they are, in steps that compute at most this many
            rows per layer; larger steps dequantize them and use the dense matmul. ``None``
            (the default): measured on this machine at load, where the kernel is faster. ``0``:
            never (every step then computes as the dequantizing path does on any device).
        expert_fetch: Mixture of experts: ``"routed"`` reads (or copies, or converts) a sparse
            layer's experts only once the router has run, and only those at least one of the
            block's tokens routes to; ``"all"`` prefetches every expert with its layer, like a
            dense layer's weights; ``"auto"`` (the default) picks per step: routed where the
            step's tokens are expected to hit under 3/4 of the experts (a decode step of a
            small block), else all (``planning/expert_fetch.py``). Experts stored where they
            are used cost nothing either way. No effect on dense models.

    Example:
        >>> policy = Policy(micro_batch_size=8, num_micro_batches=4,
        ...                 weights=Split(device=0.2, host=0.5, disk=0.3), cache=Split(host=1.0))
        >>> Policy.from_json(policy.to_json()) == policy
        True
    """

    micro_batch_size: int = 1
    num_micro_batches: int = 1
    weights: Split = field(default_factory=_all_on_device)
    cache: Split = field(default_factory=_all_on_device)
    activations: Split = field(default_factory=_all_on_device)
    overlap: bool = True
    host_attention: bool = True
    compress_weights: QuantConfig | None = None
    compress_cache: QuantConfig | None = None
    compress_embeddings: bool = False
    direct_io: bool = False
    pin_weights: bool = True
    int4_kernel_rows: int | None = None
    expert_fetch: str = "auto"

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "num_micro_batches"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"Policy.{name}",
                value,
                "must be an integer >= 1",
            )
        for name in ("weights", "cache", "activations"):
            value = getattr(self, name)
            _require(isinstance(value, Split), f"Policy.{name}", value, "must be a Split")
        for name in (
            "overlap",
            "host_attention",
            "compress_embeddings",
            "direct_io",
            "pin_weights",
        ):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"Policy.{name}", value, "must be True or False")
        _require(
            self.int4_kernel_rows is None
            or (
                isinstance(self.int4_kernel_rows, int)
                and not isinstance(self.int4_kernel_rows, bool)
                and self.int4_kernel_rows >= 0
            ),
            "Policy.int4_kernel_rows",
            self.int4_kernel_rows,
            "must be None (measured at load) or an integer >= 0 (0: never use the kernel)",
        )
        _require(
            self.expert_fetch in EXPERT_FETCH,
            "Policy.expert_fetch",
            self.expert_fetch,
            f"must be one of {list(EXPERT_FETCH)}",
        )
        for name in ("compress_weights", "compress_cache"):
            value = getattr(self, name)
            _require(
                value is None or isinstance(value, QuantConfig),
                f"Policy.{name}",
                value,
                "must be None or a QuantConfig",
            )
        _require(
            self.compress_cache is None or self.compress_cache.dim in (None, -1),
            "Policy.compress_cache.dim",
            None if self.compress_cache is None else self.compress_cache.dim,
            "the KV cache is grouped along the head dimension; leave dim=None (or -1)",
        )

    @property
    def block_size(self) -> int:
        """Sequences per block: ``micro_batch_size * num_micro_batches``."""
        return self.micro_batch_size * self.num_micro_batches

    # -- construction from other forms ---------------------------------------------------------

    @classmethod
    def from_flexgen(
        cls,
        percent: list[float] | tuple[float, ...],
        *,
        gpu_batch_size: int,
        num_gpu_batches: int,
        overlap: bool = True,
        cpu_cache_compute: bool = True,
        compress_weight: QuantConfig | None = None,
        compress_cache: QuantConfig | None = None,
        pin_weight: bool = True,
    ) -> Policy:
        """Translate FlexGen's command-line policy.

        Args:
            percent: FlexGen's ``--percent``: ``[wg, wc, cg, cc, hg, hc]``, the percentages of
                weights, cache and activations (hidden states) on GPU and CPU; the rest is disk.
            gpu_batch_size: FlexGen's ``--gpu-batch-size``.
            num_gpu_batches: FlexGen's ``--num-gpu-batches``.
            overlap: FlexGen's ``--overlap``.
            cpu_cache_compute: FlexGen's ``--cpu-cache-compute`` (our ``host_attention``).
            compress_weight: FlexGen's ``--compress-weight`` as a QuantConfig.
            compress_cache: FlexGen's ``--compress-cache`` as a QuantConfig.
            pin_weight: FlexGen's ``--pin-weight``.

        Returns:
            The equivalent Policy.
        """
        _require(len(percent) == 6, "percent", list(percent), "FlexGen's percent has 6 numbers")
        for value in percent:
            _require(0 <= value <= 100, "percent", list(percent), "each entry is 0..100")

        def split(gpu: float, cpu: float) -> Split:
            _require(gpu + cpu <= 100, "percent", list(percent), "GPU% + CPU% must be <= 100")
            return Split(device=gpu / 100, host=cpu / 100, disk=(100 - gpu - cpu) / 100)

        wg, wc, cg, cc, hg, hc = percent
        return cls(
            micro_batch_size=gpu_batch_size,
            num_micro_batches=num_gpu_batches,
            weights=split(wg, wc),
            cache=split(cg, cc),
            activations=split(hg, hc),
            overlap=overlap,
            host_attention=cpu_cache_compute,
            compress_weights=compress_weight,
            compress_cache=compress_cache,
            pin_weights=pin_weight,
        )

    # -- JSON round-trip -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        kwargs = _fields_of(cls, data)
        for name in ("weights", "cache", "activations"):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = Split.from_dict(kwargs[name])
        for name in ("compress_weights", "compress_cache"):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = QuantConfig.from_dict(kwargs[name])
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as JSON (atomically: a reader never sees half a file)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        with open(path) as f:
            return cls.from_json(f.read())


def resolve_policy(offload_policy: Policy | dict | str | os.PathLike) -> Policy | str:
    """A Policy from a Policy, a dict, a path to a JSON file, or ``"auto"``."""
    if isinstance(offload_policy, Policy):
        return offload_policy
    if isinstance(offload_policy, dict):
        return Policy.from_dict(offload_policy)
    if offload_policy == "auto":
        return "auto"
    if isinstance(offload_policy, (str, os.PathLike)) and os.path.isfile(offload_policy):
        return Policy.load(offload_policy)
    raise ValueError(
        f"Invalid offload_policy={offload_policy!r}: pass a Policy, a dict, a path to a policy "
        "JSON file, or 'auto'."
    )
