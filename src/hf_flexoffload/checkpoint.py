"""Reading a transformers safetensors checkpoint into the tiered store, one segment at a time.

Tensors are read with positional reads straight from the ``.safetensors`` files (the format is an
8-byte header length, a JSON header of dtype/shape/offsets, then raw little-endian data), so only
the rows being placed are ever in RAM; no memory map of the whole checkpoint is kept, and the
resident set while loading stays near the share placed in memory.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .storage import DiskFile, TierStore
from .weights import StageLayout, segment_key

logger = logging.getLogger(__name__)

_DTYPES = {
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
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class StoredTensor:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


def _read_header(path: str) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


class SafetensorsCheckpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint directory.

    Names are normalized by dropping a leading ``model.`` so ``OPTForCausalLM`` and ``OPTModel``
    checkpoints look the same.
    """

    def __init__(self, directory: str) -> None:
        single = os.path.join(directory, SINGLE_FILE)
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(single):
            files = [SINGLE_FILE]
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            raise FileNotFoundError(
                f"No {SINGLE_FILE} or {INDEX_FILE} in {directory!r} (found: {found[:8]}). "
                "hf_flexoffload reads safetensors checkpoints; convert others with "
                "`model.save_pretrained(dir)` (safetensors is the default)."
            )
        self.directory = directory
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, data_start = _read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}.")
                begin, _ = meta["data_offsets"]
                key = key.removeprefix("model.")
                self.tensors[key] = StoredTensor(
                    path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), data_start + begin
                )

    def fingerprint(self) -> dict:
        """Identifies the checkpoint's bytes cheaply (paths, sizes, modification times)."""
        files = sorted({t.path for t in self.tensors.values()})
        return {os.path.basename(p): [os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files}

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor, into ``out`` (contiguous, CPU, same dtype) or a
        new CPU tensor."""
        t = self.tensors[name]
        if out is None:
            out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
        f = DiskFile(t.path)
        try:
            f.read_into(t.offset + start * t.row_bytes, out)
        finally:
            f.close()
        return out


def check_tensors(
    ckpt: SafetensorsCheckpoint, layouts: list[StageLayout], aliases: Iterable[str]
) -> None:
    """Every tensor the layout needs exists with the right shape; say which do not."""
    problems = []
    for layout in layouts:
        for spec in layout.specs:
            stored = ckpt.tensors.get(spec.name)
            if stored is None:
                problems.append(f"missing {spec.name} {list(spec.shape)}")
            elif stored.shape != spec.shape:
                problems.append(
                    f"{spec.name}: shape {list(stored.shape)}, config says {list(spec.shape)}"
                )
    for name in aliases:
        if name not in ckpt.tensors:
            problems.append(f"missing {name}")
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise ValueError(
            f"The checkpoint in {ckpt.directory!r} does not match its config.json: {shown}. "
            "Is config.json from the same model as the weights?"
        )


def load_into_store(
    ckpt: SafetensorsCheckpoint,
    layouts: list[StageLayout],
    store: TierStore,
    dtype: torch.dtype,
) -> int:
    """Place every segment of every stage in the store, converting to ``dtype`` per segment.

    Disk segments a previous run left complete (same checkpoint, dtype and placement) are adopted
    instead of rewritten. Returns the number of bytes read from the checkpoint.
    """
    read = 0
    scratch = torch.empty(0, dtype=torch.uint8)  # one reused buffer for segments bound for disk
    for layout in layouts:
        specs = {s.name: s for s in layout.specs}
        for seg in layout.segments:
            spec = specs[seg.name]
            key = segment_key(seg, spec)
            shape = (seg.stop - seg.start, *spec.shape[1:])
            if seg.tier == "disk" and store.adopt(key, shape, dtype):
                continue
            stored = ckpt.tensors[seg.name]
            direct = seg.tier != "disk" and stored.dtype == dtype
            if direct and (store.device.type == "cpu" or seg.tier == "host"):
                # Read straight into the tier's tensor: no second copy in RAM.
                ckpt.read_rows(
                    seg.name, seg.start, seg.stop, store.allocate(key, shape, dtype, seg.tier)
                )
            else:
                nbytes = (seg.stop - seg.start) * stored.row_bytes
                if scratch.numel() < nbytes:
                    scratch = torch.empty(nbytes, dtype=torch.uint8)
                view = scratch[:nbytes].view(stored.dtype).view(shape)
                ckpt.read_rows(seg.name, seg.start, seg.stop, view)
                store.put(key, view.to(dtype), seg.tier)
            read += (seg.stop - seg.start) * stored.row_bytes
    return read
