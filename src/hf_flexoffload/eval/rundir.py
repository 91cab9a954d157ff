"""A run's directory, ``runs/<name>/``, written so that nothing finished is ever lost.

* ``run_spec.json``: what the run is (``identity``: scenario, dataset content, model config and
  weight files, tokenizer, options); checked on resume, naming what changed.
* ``.lock``: held (``flock``) by the process running the run, with its pid inside: a second run
  into the same directory is refused while the first runs; a killed run's lock is released by
  the system with its process, so it is never stale.
* ``instances.jsonl``: one JSON record per finished instance, appended and fsynced block by
  block (longest prompts first), then rewritten in scenario order at the end. With several
  processes each rank appends to ``instances.rank-<r>.jsonl`` and rank 0 merges them into
  ``instances.jsonl`` at the end.
* ``stats.json``: aggregates, written atomically (temporary file, then rename) at the end.

A crash can leave at most a partial last line (the block in flight); reading skips it and
appending first cuts it off, so a resumed run's records are exactly the finished ones.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

from .identity import differences

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock falls back to the pid alone
    fcntl = None

logger = logging.getLogger(__name__)

SPEC_FILE, INSTANCES_FILE, STATS_FILE = "run_spec.json", "instances.jsonl", "stats.json"
LOCK_FILE = ".lock"
_HELD: dict[str, list[int]] = {}  # lock path -> [descriptor, holders in this process]


class RunInUseError(FileExistsError):
    """Another live process is running into the same run directory."""


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path: str) -> list[dict]:
    """The complete records of a JSON-lines file (a partial last line is not one)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut short by a crash
            records.append(json.loads(line))
    return records


def _cut_partial_line(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            logger.warning("%s: dropping a partial last record (an interrupted block)", path)
            f.truncate(end)


class RecordWriter:
    """Appends records to one JSON-lines file, durably, a block at a time."""

    def __init__(self, path: str) -> None:
        _cut_partial_line(path)
        self.path = path
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def append(self, records: Iterable[dict]) -> None:
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDirectory:
    """``<output>/<name>/`` of one evaluation run.

    Args:
        path: The run's directory (created if missing).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check(self, spec: dict[str, Any], resume: bool) -> None:
        """Check that this run may go here, without writing anything.

        Raises:
            ValueError: The directory holds a different run.
            FileExistsError: It holds finished instances of this run and ``resume`` is off.
        """
        existing_path = self.file(SPEC_FILE)
        if not os.path.exists(existing_path):
            return
        with open(existing_path) as f:
            existing = json.load(f)
        changed = differences(existing, spec)
        if changed:
            raise ValueError(
                f"{self.path} holds a different run: {', '.join(changed)} changed since it "
                f"was recorded in {SPEC_FILE}. Use another --output directory or --run-name, "
                "or delete it to start over."
            )
        if not resume and self.records():
            raise FileExistsError(
                f"{self.path} already has finished instances of this run. Pass --resume "
                "(resume=True) to continue it, or use another --output directory."
            )

    def prepare(self, spec: dict[str, Any], resume: bool) -> None:
        """``check``, then record the run spec."""
        self.check(spec, resume)
        os.makedirs(self.path, exist_ok=True)
        write_json_atomic(self.file(SPEC_FILE), spec)

    def lock(self) -> None:
        """Hold the directory for this process until ``unlock`` (re-entrant within it).

        Raises:
            RunInUseError: Another live process holds it.
        """
        os.makedirs(self.path, exist_ok=True)
        path = self.file(LOCK_FILE)
        if path in _HELD:
            _HELD[path][1] += 1
            return
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif _live_holder(fd):
                    raise BlockingIOError
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
                os.close(fd)
                raise RunInUseError(
                    f"{self.path} is in use by a run still going ({holder}). Wait for it to "
                    "end, or use another --output directory or --run-name."
                ) from None
            if _same_file(path, fd):
                break
            os.close(fd)  # removed by the run that held it, between our open and lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _HELD[path] = [fd, 1]

    def unlock(self) -> None:
        """Stop holding the directory (when the last holder in this process lets go)."""
        held = _HELD.get(self.file(LOCK_FILE))
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            os.remove(self.file(LOCK_FILE))  # before letting go: a waiter re-checks the path
            os.close(held[0])
            del _HELD[self.file(LOCK_FILE)]

    def shard_path(self, rank: int, world_size: int) -> str:
        if world_size == 1:
            return self.file(INSTANCES_FILE)
        return self.file(f"instances.rank-{rank}.jsonl")

    def records(self) -> list[dict]:
        """Every finished record: the merged file and any rank shards, first copy of an id."""
        paths = [self.file(INSTANCES_FILE)]
        paths += sorted(glob.glob(self.file("instances.rank-*.jsonl")))
        seen: dict[str, dict] = {}
        for path in paths:
            for record in read_records(path):
                seen.setdefault(record["id"], record)
        return list(seen.values())

    def merge(self, order: list[str]) -> list[dict]:
        """Gather every rank's records into ``instances.jsonl`` in scenario order, atomically,
        then remove the shards. Returns the merged records."""
        rank = {ident: i for i, ident in enumerate(order)}
        records = sorted(self.records(), key=lambda r: rank.get(r["id"], len(rank)))
        tmp = self.file(f"{INSTANCES_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file(INSTANCES_FILE))
        for shard in glob.glob(self.file("instances.rank-*.jsonl")):
            os.remove(shard)
        return records

    def write_stats(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.file(STATS_FILE), stats)


def _live_holder(fd: int) -> bool:
    """Without ``flock``: whether the pid written in the lock file is a live process here."""
    text = os.pread(fd, 200, 0).decode(errors="replace").split()
    if len(text) < 4 or text[0] != "pid" or text[3] != socket.gethostname():
        return False
    try:
        os.kill(int(text[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(text[1]) != os.getpid()


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
