"""The safetensors file format, as far as this package reads and writes it: an 8-byte
little-endian header length, a JSON header (per tensor its dtype, shape and data offsets, plus an
optional ``__metadata__`` of strings), then the raw little-endian tensor bytes."""

from __future__ import annotations

import json
import struct

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file, and the absolute offset of its data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (length,) = struct.unpack("<Q", head)
        try:
            return json.loads(f.read(length)), 8 + length
        except ValueError as err:
            raise ValueError(f"{path} is not a safetensors file (unreadable header).") from err


def encode_header(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    """The header bytes (length prefix included) for ``entries`` (name -> dtype, shape and
    data_offsets), padded so the data starts 8-byte aligned, as safetensors does."""
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header
