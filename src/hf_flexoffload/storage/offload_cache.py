"""``FlexOffloadCache``: the ``transformers.Cache`` that carries the tiered KV units of
``kv_cache`` through ``generate``, one unit per (layer, micro-batch), each on the tier the policy's
cache split gives it.

transformers only asks it for its length and a few properties; everything else (appending,
attending, moving history between tiers) happens in the units, driven by the schedule.
"""

from __future__ import annotations

import os

import torch
from transformers import Cache

from ..config.counters import Counters
from ..config.policy import Split
from ..formats.compression import QuantConfig
from .kv_cache import KVUnit
from .kv_codec import HistoryBuffers
from .placement import assign_units


class FlexOffloadCache(Cache):
    """A ``transformers.Cache`` whose storage is spread over device, host and disk.

    Created empty by the model's ``generate`` (or by ``forward`` when ``use_cache``
    and no cache is given); the units are allocated by the first forward, when the micro-batch
    sizes are known. ``transformers`` only asks it for its length.

    Args:
        num_layers: Decoder layers.
        windows: Per layer, the sliding window its unit keeps (a ring of that many positions)
            or None; () = none anywhere.
        split: The policy's cache split, realized over (layer, micro-batch) units.
        host_attention: The policy's ``host_attention``.
        heads, head_dim: Heads stored per token (``num_key_value_heads``) and their width.
        dtype: Storage dtype.
        device: The compute device.
        directory: Where disk units put their files.
        counters: Byte counters.
        capacity: Expected total length (prompt + new tokens) to size memory buffers once.
        compress: ``Policy.compress_cache``: quantize each token's keys and values.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        windows: tuple[int | None, ...] = (),
        split: Split,
        host_attention: bool,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        directory: str,
        counters: Counters,
        capacity: int = 0,
        compress: QuantConfig | None = None,
    ) -> None:
        super().__init__(layers=[])
        self.compress = compress
        self.num_layers = num_layers
        self.windows = tuple(windows) or (None,) * num_layers
        self.split = split
        self.host_attention = host_attention
        self._shape = (heads, head_dim)
        self.dtype = dtype
        self.compute_device = device
        self.directory = directory
        self.counters = counters
        self.capacity = capacity
        self.units: list[list[KVUnit]] = []
        self.micro_batch_sizes: tuple[int, ...] = ()
        self._scratch = HistoryBuffers(device, counters)

    def allocate(self, micro_batch_sizes: tuple[int, ...]) -> None:
        """Create the units for these micro-batches (first forward), or check they match."""
        if self.units:
            if micro_batch_sizes != self.micro_batch_sizes:
                raise ValueError(
                    f"This cache holds micro-batches of sizes {list(self.micro_batch_sizes)} but "
                    f"the forward got {list(micro_batch_sizes)}; a cache belongs to one batch."
                )
            return
        tiers = assign_units(self.num_layers * len(micro_batch_sizes), self.split)
        if "disk" in tiers:
            os.makedirs(self.directory, exist_ok=True)
        k = len(micro_batch_sizes)
        self.units = [
            [
                KVUnit(
                    tier=tiers[j * k + m],
                    batch=size,
                    heads=self._shape[0],
                    head_dim=self._shape[1],
                    dtype=self.dtype,
                    device=self.compute_device,
                    host_attention=self.host_attention,
                    path=os.path.join(self.directory, f"kv-{id(self):x}-{j}-{m}.bin"),
                    counters=self.counters,
                    capacity=self.capacity,
                    compress=self.compress,
                    scratch=self._scratch,
                    window=self.windows[j],
                )
                for m, size in enumerate(micro_batch_sizes)
            ]
            for j in range(self.num_layers)
        ]
        self.micro_batch_sizes = tuple(micro_batch_sizes)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.units[layer_idx][0].length if self.units else 0

    # transformers' Cache answers these from its ``layers``, which are ours, not its: with none
    # it would say "all linear attention" (so generate's prefill would skip its length checks)
    # and "croppable" (so a deferred stop check would call ``crop``, which raises).
    @property
    def is_linear(self) -> list[bool]:
        """Per layer: none is linear attention (every layer keeps its keys and values)."""
        return [False] * self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: none has a sliding window."""
        return [False] * self.num_layers

    @property
    def is_croppable(self) -> bool:
        """False: the offloaded units cannot be rolled back."""
        return False

    @property
    def is_compileable(self) -> bool:
        """False: the schedule runs eagerly, with I/O between layers."""
        return False

    def realized_split(self) -> dict[str, float]:
        """Fraction of KV bytes per tier (units weighted by micro-batch size)."""
        weights = {"device": 0, "host": 0, "disk": 0}
        for row in self.units:
            for unit in row:
                weights[unit.tier] += unit.token_shape[1]
        total = sum(weights.values()) or 1
        return {t: w / total for t, w in weights.items()}

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"FlexOffloadCache does not support {what}: it is built for plain left-to-right "
            "generation (greedy or sampling). Beam search, assisted decoding and cache cropping "
            "are not available with offloaded models."
        )

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache (beam search)")

    def crop(self, max_length: int):
        self._unsupported("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def drain(self) -> None:
        """Wait for every pending write-back."""
        for row in self.units:
            for unit in row:
                unit.wait_pending()

    def reset(self) -> None:
        """Forget every position (free the units' memory and files): the next forward starts
        over from its first token, as transformers does when it drops a cache."""
        for row in self.units:
            for unit in row:
                unit.close()
        self.units = []

    def close(self) -> None:
        """Finish pending writes and free every unit's memory and files."""
        self.reset()
        self._scratch.close()
