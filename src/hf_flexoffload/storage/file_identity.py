"""Cheap identities of files: what a file is (size, modification time, inode) and a content
check that reads a few sampled blocks, so a file replaced by other bytes of the same size is
noticed without reading all of it.

Used for the offload directory's own files (checked when a later load would reuse them and
before every run) and for checkpoint files (part of what an offload directory and an eval run
record as the model's identity).
"""

from __future__ import annotations

import hashlib
import os

# A content check reads SAMPLES blocks of SAMPLE_BYTES, spread evenly over the file (the first
# and the last included): 64 KiB per file, whatever its size.
SAMPLES = 16
SAMPLE_BYTES = 4096


def stat_identity(path: str) -> tuple[int, int, int, int]:
    """(size, modification time in ns, inode, device) of ``path``: changes whenever the file is
    rewritten or replaced."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def sampled_digest(path: str) -> str:
    """A hash of the file's size and of ``SAMPLES`` blocks spread over it (all of it when small).

    Cheap enough to run on every load (64 KiB read per file); it catches a file overwritten with
    other weights of the same size, not a change confined to bytes between the samples.
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
            for i in range(SAMPLES):
                h.update(os.pread(f.fileno(), SAMPLE_BYTES, int(i * step)))
    return h.hexdigest()


def content_identity(path: str) -> dict:
    """What identifies a file's bytes: its size and sampled content digest (not its path or
    time: the same file reached by another path, or copied, is the same content)."""
    return {"size": os.path.getsize(path), "digest": sampled_digest(path)}
