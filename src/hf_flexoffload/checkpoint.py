"""Safetensors checkpoints in and out of the tiered store, one segment at a time.

Tensors are read with positional reads straight from the ``.safetensors`` files (the format is an
8-byte header length, a JSON header of dtype/shape/offsets, then raw little-endian data), so only
the rows being placed are ever in RAM; no memory map of the whole checkpoint is kept, and the
resident set while loading stays near the share placed in memory. A weight to be compressed is
quantized a block of rows at a time and its bytes placed like any segment.

``save_store`` writes the placed weights back as one safetensors file, streaming tensor by tensor;
with compressed weights that is a compressed checkpoint, marked in the header's metadata, which
later loads place without quantizing again.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from .compression import QuantConfig, quantize_rows_to_bytes
from .policy import Policy
from .storage import DiskFile, TierStore, dtype_from_name, dtype_name
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
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


COMPRESSED_FORMAT = "hf_flexoffload.compressed"
COMPRESSED_VERSION = "1"


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
            config=QuantConfig(**json.loads(metadata["compress_weights"])),
            embeddings=json.loads(metadata["compress_embeddings"]),
            dtype=dtype_from_name(metadata["dtype"]),
        )


def _as_matrix_config(config: QuantConfig) -> QuantConfig:
    # Compressed weights are matrices: dim None, 0 and -2 all mean dim 0.
    return replace(config, dim=0 if config.dim is None else config.dim % 2)


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
        self.metadata: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, data_start = _read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    self.metadata.update(meta or {})
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}.")
                begin, _ = meta["data_offsets"]
                key = key.removeprefix("model.")
                self.tensors[key] = StoredTensor(
                    path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), data_start + begin
                )

    @property
    def compression(self) -> SavedCompression | None:
        """How the weights were compressed, for a checkpoint written by ``save_store``."""
        return SavedCompression.from_metadata(self.metadata, repr(self.directory))

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
    ckpt: SafetensorsCheckpoint,
    layouts: list[StageLayout],
    aliases: Iterable[str],
    compressed: bool = False,
) -> None:
    """Every tensor the layout needs exists with the right shape; say which do not.

    ``compressed``: the checkpoint holds quantized weights as bytes (as ``save_store`` writes).
    """
    problems = []
    for layout in layouts:
        for spec in layout.specs:
            stored = ckpt.tensors.get(spec.name)
            fmt = layout.formats.get(spec.name)
            expected = spec.shape if fmt is None or compressed else fmt.shape
            if stored is None:
                problems.append(f"missing {spec.name} {list(expected)}")
            elif stored.shape != expected:
                problems.append(
                    f"{spec.name}: shape {list(stored.shape)}, config says {list(expected)}"
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


# Loading converts and writes a chunk of rows at a time: at most ``load_chunk_bytes`` of
# checkpoint rows, and as many of converted rows, are in RAM beside what the placement keeps.
LOAD_CHUNK_BYTES = 16 << 20
_MIN_LOAD_CHUNK = 1 << 20


def load_chunk_bytes(largest_layer_tensor: int) -> int:
    """Bytes per load chunk for a model whose largest decoder-layer tensor has that many
    elements: one byte per element of it, between 1 MiB and ``LOAD_CHUNK_BYTES`` (small models
    get small chunks, so the load buffers stay a small share of them)."""
    return min(LOAD_CHUNK_BYTES, max(_MIN_LOAD_CHUNK, largest_layer_tensor))


def load_into_store(
    ckpt: SafetensorsCheckpoint,
    layouts: list[StageLayout],
    store: TierStore,
    chunk_bytes: int = LOAD_CHUNK_BYTES,
) -> int:
    """Place every segment of every stage in the store, in the layout's storage dtypes.

    Plain tensors are read, converted and written a chunk of rows at a time straight into their
    destination (a memory-tier tensor, or the disk file); tensors to compress are quantized (on
    the compute device, a block of rows at a time) and their bytes placed, unless the checkpoint
    already holds them quantized. Disk segments a previous run left complete (same checkpoint,
    dtype, compression and placement) are adopted instead of rewritten. Returns the bytes read
    from the checkpoint.
    """
    read = 0
    scratch = _Scratch(chunk_bytes)
    for layout in layouts:
        specs = {s.name: s for s in layout.specs}
        packed_name, packed = None, None  # the tensor being quantized, and its bytes
        for seg in layout.segments:
            spec = specs[seg.name]
            key = segment_key(seg, spec)
            shape = (seg.stop - seg.start, *spec.shape[1:])
            dtype = layout.storage_dtype(seg.name)
            if seg.tier == "disk" and store.adopt(key, shape, dtype):
                continue
            stored = ckpt.tensors[seg.name]
            if seg.name in layout.formats and stored.dtype != torch.uint8:
                if packed_name != seg.name:
                    packed_name, packed = None, None  # free the previous tensor's bytes first
                    packed = _quantized_bytes(ckpt, layout, seg.name, store.device, chunk_bytes)
                    packed_name = seg.name
                    read += stored.row_bytes * stored.shape[0]
                store.put(key, packed[seg.start : seg.stop], seg.tier)
                continue
            direct = seg.tier != "disk" and stored.dtype == dtype
            if direct and (store.device.type == "cpu" or seg.tier == "host"):
                # Read straight into the tier's tensor: no second copy in RAM.
                ckpt.read_rows(
                    seg.name, seg.start, seg.stop, store.allocate(key, shape, dtype, seg.tier)
                )
            else:
                chunks = _row_chunks(ckpt, seg.name, seg.start, seg.stop, dtype, scratch)
                store.put_chunks(key, shape, dtype, seg.tier, chunks)
            read += (seg.stop - seg.start) * stored.row_bytes
    return read


class _Scratch:
    """The two reused chunk buffers of a load: checkpoint rows, and the same rows converted."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def _row_chunks(
    ckpt: SafetensorsCheckpoint,
    name: str,
    start: int,
    stop: int,
    dtype: torch.dtype,
    scratch: _Scratch,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row offset from ``start``, rows in ``dtype``) chunks of rows ``[start, stop)``."""
    stored = ckpt.tensors[name]
    step = max(1, scratch.chunk_bytes // max(1, stored.row_bytes))
    for a in range(start, stop, step):
        b = min(stop, a + step)
        shape = (b - a, *stored.shape[1:])
        rows = scratch.get("read", (b - a) * stored.row_bytes).view(stored.dtype).view(shape)
        ckpt.read_rows(name, a, b, rows)
        if dtype != stored.dtype:
            converted = scratch.get("converted", rows.numel() * dtype.itemsize)
            rows = converted.view(dtype).view(shape).copy_(rows)
        yield a - start, rows


def _quantized_bytes(
    ckpt: SafetensorsCheckpoint,
    layout: StageLayout,
    name: str,
    device: torch.device,
    chunk_bytes: int,
) -> torch.Tensor:
    fmt = layout.formats[name]

    def read(start: int, stop: int) -> torch.Tensor:
        return ckpt.read_rows(name, start, stop).to(device, fmt.dtype)

    return quantize_rows_to_bytes(read, fmt, block_bytes=chunk_bytes)


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
                "dtype": _NAMES[dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as safetensors does
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for layout in layouts:
            for spec in layout.specs:
                for seg in layout.segments_of(spec.name):
                    rows = store.get(segment_key(seg, spec)).to("cpu").contiguous()
                    f.write(memoryview(rows.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
