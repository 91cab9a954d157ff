"""One model's share of an offload directory, and the locks that keep models and processes
from using each other's files.

The disk tier's files of a load go to ``<offload_dir>/weights/<key>/``, where ``key`` is a hash
of everything that decides their bytes (the checkpoint files' identities, the config, the
compute and storage dtypes, the placement, the quantization). A second model, or the same model
stored otherwise, in the same ``offload_dir`` gets a directory of its own: it never reads,
overwrites or removes another's files.

Two advisory locks (``flock``) per model directory, each in a file of its own:

* ``.in-use.lock``, held shared from the start of a load until the model is closed: a model
  directory that no one holds is removed by the next load of another model into the same
  ``offload_dir`` (so the disk holds what is in use, as one model's files did before), one that
  is held is left alone.
* ``.load.lock``, held exclusively while a load checks, writes and indexes the files: a second
  process loading the same model waits, then adopts the complete files the first one wrote.

Where ``fcntl`` is missing (not POSIX) nothing is locked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

IN_USE = ".in-use.lock"
LOADING = ".load.lock"


def model_key(fingerprint: dict[str, Any]) -> str:
    """The directory name for files written under ``fingerprint``."""
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _lock(path: str, mode: int, blocking: bool = True) -> int | None:
    """An open descriptor of ``path`` holding ``flock(mode)``; None if not blocking and taken.

    Retries when the file was removed (by a pruning load) between opening and locking, so the
    lock held is always on the file now at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        os.makedirs(os.path.dirname(path), exist_ok=True)


class ModelDirectory:
    """``<root>/<model_key(fingerprint)>``, held in use (shared lock) from construction until
    ``close``.

    Args:
        root: The directory holding every model's directory (``<offload_dir>/weights``).
        fingerprint: What the files will hold (see ``model_key``).
    """

    def __init__(self, root: str, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.path = os.path.join(root, model_key(fingerprint))
        os.makedirs(self.path, exist_ok=True)
        self._in_use = _lock(os.path.join(self.path, IN_USE), fcntl.LOCK_SH if fcntl else 0)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Held exclusively while the files are checked, written and indexed."""
        fd = _lock(os.path.join(self.path, LOADING), fcntl.LOCK_EX if fcntl else 0)
        try:
            yield
        finally:
            os.close(fd)

    def prune_others(self) -> None:
        """Remove the other model directories under ``root`` that no one holds (files of a
        model loaded earlier and since closed), and files left directly in ``root`` by
        versions that kept one model's files there."""
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if path == self.path:
                continue
            if not os.path.isdir(path):
                if name.endswith(".bin") or name.startswith("index.json"):
                    os.remove(path)
                continue
            if fcntl is None or not os.path.exists(os.path.join(path, IN_USE)):
                continue  # not ours, or not safely removable
            fd = _lock(os.path.join(path, IN_USE), fcntl.LOCK_EX, blocking=False)
            if fd is None:
                continue  # in use by a model (in this or another process)
            try:
                logger.info("Removing the unused offload files in %s", path)
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Stop holding the directory (the next load of another model may remove it)."""
        if self._in_use is not None and self._in_use >= 0:
            os.close(self._in_use)
        self._in_use = -1
