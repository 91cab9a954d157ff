"""Compressed checkpoints: the placed (quantized) weights written back as one safetensors file,
marked in its metadata, so a later load places them without quantizing again."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch

from ..config.policy import Policy
from ..formats.compression import QuantConfig
from ..storage.tier_store import TierStore, dtype_from_name, dtype_name
from ..storage.weight_layout import StageLayout, segment_key
from .safetensors_format import NAMES, encode_header

COMPRESSED_FORMAT = "hf_flexoffload.compressed"
# 2: QuantConfig.dim=None means the input channels (in 1: the output channels), and the config
# has ``rounding``; a version-1 file is refused rather than read with the new meaning.
COMPRESSED_VERSION = "2"


@dataclass(frozen=True)
class SavedCompression:
    """How the weights of a compressed checkpoint were quantized."""

    config: QuantConfig
    embeddings: bool
    dtype: torch.dtype

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (string values only) that marks the checkpoint."""
        return {
            "format": COMPRESSED_FORMAT,
            "version": COMPRESSED_VERSION,
            "compress_weights": json.dumps(asdict(self.config)),
            "compress_embeddings": json.dumps(self.embeddings),
            "dtype": dtype_name(self.dtype),
        }

    def check(self, policy: Policy, where: str) -> None:
        """Raise unless ``policy`` asks for the compression these weights were saved with."""
        wanted = policy.compress_weights
        same = wanted is not None and _as_matrix_config(wanted) == _as_matrix_config(self.config)
        if not same or policy.compress_embeddings != self.embeddings:
            raise ValueError(
                f"{where!r} holds weights compressed with compress_weights={self.config} and "
                f"compress_embeddings={self.embeddings}, but the policy asks for "
                f"compress_weights={wanted} and compress_embeddings={policy.compress_embeddings}. "
                "Use the checkpoint's settings (or offload_policy='auto'), or load the original, "
                "uncompressed checkpoint to compress it differently."
            )

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> SavedCompression | None:
        if metadata.get("format") != COMPRESSED_FORMAT:
            return None
        if metadata.get("version") != COMPRESSED_VERSION:
            raise ValueError(
                f"{where} is a compressed checkpoint of format version "
                f"{metadata.get('version')!r}; this hf_flexoffload reads version "
                f"{COMPRESSED_VERSION}. Compress the original checkpoint again."
            )
        return cls(
            config=QuantConfig.from_dict(json.loads(metadata["compress_weights"])),
            embeddings=json.loads(metadata["compress_embeddings"]),
            dtype=dtype_from_name(metadata["dtype"]),
        )


def _as_matrix_config(config: QuantConfig) -> QuantConfig:
    # Compressed weights are matrices quantized once: dim None, 1 and -1 all mean dim 1 (0 and
    # -2 mean 0), and rounding None means "search".
    dim = 1 if config.dim is None else config.dim % 2
    return replace(config.resolved("search"), dim=dim)


def save_store(
    path: str, layouts: list[StageLayout], store: TierStore, metadata: dict[str, str]
) -> None:
    """Write every stage's stored tensors to one safetensors file, one tensor at a time.

    Written to a temporary name and renamed, so ``path`` is either complete or absent.
    """
    entries, offset = {}, 0
    for layout in layouts:
        for spec in layout.specs:
            dtype = layout.storage_dtype(spec.name)
            entries[spec.name] = {
                "dtype": NAMES[dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(encode_header(metadata, entries))
        for layout in layouts:
            for spec in layout.specs:
                for seg in layout.segments_of(spec.name):
                    rows = store.get(segment_key(seg, spec)).to("cpu").contiguous()
                    f.write(memoryview(rows.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
