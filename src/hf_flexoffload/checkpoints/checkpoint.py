"""Checkpoint directories as users have them: safetensors or PyTorch ``.bin`` weights, single
files or shards with an index, read a row range at a time.

Safetensors tensors are read with positional reads straight from the files (see
``safetensors_format``), so only the rows being placed are ever in RAM, and a tensor's rows can
be read in place later (``file_range``: the checkpoint file *is* the disk tier). ``.bin`` shards
are opened with ``torch.load(mmap=True, weights_only=True)``, one shard at a time: tensors are
read through the memory map without loading the shard, and nothing but tensors is ever
unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..storage.disk_file import DiskFile
from ..storage.file_identity import content_identity
from ..storage.weight_layout import StageLayout
from .compressed_checkpoint import SavedCompression
from .safetensors_format import DTYPES, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """One checkpoint tensor: its file, dtype and shape, and where its bytes start in the file
    (``None`` when the file is not raw bytes, as in ``.bin`` archives)."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


def _normalize(key: str) -> str:
    # ``OPTForCausalLM`` and ``OPTModel`` checkpoints look the same without the prefix.
    return key.removeprefix("model.")


def _shard_files(directory: str, index: str, single: str) -> list[str] | None:
    """The weight files of one format: the index's shards, the single file, or None."""
    if os.path.exists(os.path.join(directory, index)):
        with open(os.path.join(directory, index)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(directory, single)):
        return [single]
    return None


class Checkpoint:
    """The tensors of a checkpoint directory, by normalized name.

    Attributes:
        directory: The directory.
        tensors: Normalized name -> ``StoredTensor``.
        metadata: The safetensors ``__metadata__`` (empty for ``.bin``).
    """

    def __init__(self, directory: str, files: list[str]) -> None:
        self.directory = directory
        self.files = [os.path.join(directory, name) for name in files]
        missing = [p for p in self.files if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"The checkpoint in {directory!r} names weight files that are not there: "
                f"{[os.path.basename(p) for p in missing]}. Download the whole checkpoint again."
            )
        self.tensors: dict[str, StoredTensor] = {}
        self.metadata: dict[str, str] = {}

    @property
    def compression(self) -> SavedCompression | None:
        """How the weights were compressed, for a checkpoint written by ``save_store``."""
        return SavedCompression.from_metadata(self.metadata, repr(self.directory))

    def fingerprint(self) -> dict:
        """Identifies the checkpoint's files where they are: each file's real path, size,
        modification time and sampled content digest (``storage.file_identity``)."""
        return {
            os.path.realpath(p): [os.stat(p).st_mtime_ns, content_identity(p)] for p in self.files
        }

    def rename(self, renamed: dict[str, str]) -> None:
        """Read tensors stored under another release's name by the name the architecture asks
        for (``Architecture.renamed_tensors``: stored name -> name), where only the other is
        present."""
        for old, new in renamed.items():
            if old in self.tensors and new not in self.tensors:
                self.tensors[new] = self.tensors.pop(old)
                keys = getattr(self, "_keys", None)
                if keys is not None:
                    keys[new] = keys.pop(old)

    def content_identity(self) -> dict:
        """Identifies the checkpoint's bytes wherever they are: each file's name, size and
        sampled content digest (the same for a copy, or the same files by another path)."""
        return {os.path.basename(p): content_identity(p) for p in self.files}

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def file_range(self, name: str, start: int) -> tuple[str, int] | None:
        """(file, byte offset) where row ``start`` of a tensor lies as raw bytes, the rows after
        it following; None when the file cannot be read in place."""
        t = self.tensors[name]
        return None if t.offset is None else (t.path, t.offset + start * t.row_bytes)

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor, into ``out`` (contiguous, CPU, same dtype) or a
        new CPU tensor."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what reading holds open (a no-op for safetensors)."""


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors checkpoint: ``model.safetensors``, or shards named by its index."""

    def __init__(self, directory: str, files: list[str]) -> None:
        super().__init__(directory, files)
        for path in self.files:
            header, data_start = read_header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    self.metadata.update(meta or {})
                    continue
                if meta["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}.")
                begin, _ = meta["data_offsets"]
                self.tensors[_normalize(key)] = StoredTensor(
                    path, DTYPES[meta["dtype"]], tuple(meta["shape"]), data_start + begin
                )

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = self.tensors[name]
        if out is None:
            out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
        f = DiskFile(t.path)
        try:
            f.read_into(t.offset + start * t.row_bytes, out)
        finally:
            f.close()
        return out


class TorchCheckpoint(Checkpoint):
    """A PyTorch checkpoint: ``pytorch_model.bin``, or shards named by its index.

    Each shard is memory-mapped (``torch.load(mmap=True, weights_only=True)``) while its tensors
    are read, and unmapped when the next shard is opened, so at most one shard's touched pages
    are mapped at a time.
    """

    def __init__(self, directory: str, files: list[str]) -> None:
        super().__init__(directory, files)
        self._keys: dict[str, str] = {}  # normalized name -> key in the shard
        self._open: tuple[str, dict[str, torch.Tensor]] | None = None
        for path in self.files:
            for key, t in _load_shard(path).items():
                if t.dtype not in DTYPES.values():
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {t.dtype}.")
                self.tensors[_normalize(key)] = StoredTensor(path, t.dtype, tuple(t.shape), None)
                self._keys[_normalize(key)] = key

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        path = self.tensors[name].path
        if self._open is None or self._open[0] != path:
            self._open = None  # unmap the previous shard first
            self._open = (path, _load_shard(path))
        rows = self._open[1][self._keys[name]][start:stop]
        return rows.clone() if out is None else out.copy_(rows)

    def close(self) -> None:
        self._open = None


def _load_shard(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors; hf_flexoffload never unpickles arbitrary objects "
            "(torch.load(weights_only=True) refused it). If you trust the file, convert it to "
            "safetensors: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)."
        ) from err
    except RuntimeError as err:
        raise ValueError(
            f"{path} cannot be memory-mapped ({err}); it is probably in PyTorch's legacy "
            "(pre-1.6) format. Convert it to safetensors with transformers' save_pretrained."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (a name -> tensor mapping).")
    return state


def open_checkpoint(directory: str, use_safetensors: bool | None = None) -> Checkpoint:
    """The checkpoint in ``directory``: safetensors when present (and allowed), else ``.bin``.

    Args:
        use_safetensors: True reads only safetensors, False only ``.bin``; None prefers
            safetensors, as transformers does.
    """
    if use_safetensors is not False:
        files = _shard_files(directory, INDEX_FILE, SINGLE_FILE)
        if files is not None:
            return SafetensorsCheckpoint(directory, files)
    if use_safetensors is not True:
        files = _shard_files(directory, BIN_INDEX_FILE, BIN_FILE)
        if files is not None:
            return TorchCheckpoint(directory, files)
    wanted = {
        True: [SINGLE_FILE, INDEX_FILE],
        False: [BIN_FILE, BIN_INDEX_FILE],
        None: [SINGLE_FILE, INDEX_FILE, BIN_FILE, BIN_INDEX_FILE],
    }[use_safetensors]
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    raise FileNotFoundError(
        f"No weights in {directory!r}: looked for {', '.join(wanted)}"
        + (f" (use_safetensors={use_safetensors})" if use_safetensors is not None else "")
        + f"; found {found[:8]}. Save the model with `model.save_pretrained(dir)`."
    )


def check_tensors(
    ckpt: Checkpoint,
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
        fused = any(".experts.gate_up_proj" in name for name in ckpt.tensors)
        hint = (
            "Its experts are stored fused (save_pretrained(..., save_original_format=False)): "
            "load it with transformers and save it again with save_pretrained(path), which "
            "writes one tensor per expert."
            if fused
            else "Is config.json from the same model as the weights?"
        )
        raise ValueError(
            f"The checkpoint in {ckpt.directory!r} does not match its config.json: {shown}. {hint}"
        )
