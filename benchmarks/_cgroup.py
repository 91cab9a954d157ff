"""Honest memory budgets: one benchmark run inside a memory cgroup, page cache included.

A budget measured as RSS lets every system keep its offloaded weights in the page cache for
free (a 1.3B model "on disk" is read from RAM). Inside a memory cgroup the page cache a process
fills is charged to it, so a budget there holds for everything the run touches: heap, mapped
files and cached file pages (the kernel drops clean cache pages before anything is killed).

``MemoryCgroup`` is cgroup v1 (``/sys/fs/cgroup/memory/<name>``), the kind these machines have,
and needs root. The run's process joins it first thing (``join``), its pages so far moving
with it, and the limit is then set to what it uses at that point (the interpreter with torch
and transformers imported) plus the budget. ``drop_page_cache`` empties the page cache so that
"cold" means cold. Where no cgroup can be made, ``make`` returns None with the reason and the
benchmarks fall back to RSS sampling, saying so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import ChildDied, in_fresh_process

ROOT = "/sys/fs/cgroup/memory"


@dataclass(frozen=True)
class MemoryCgroup:
    """A cgroup v1 memory cgroup at ``path`` for one run (see the module docstring)."""

    path: str
    budget: int  # bytes allowed above the joining process's usage at join time

    @classmethod
    def make(cls, name: str, budget: int) -> tuple[MemoryCgroup | None, str]:
        """A new cgroup (named after ``name`` and this process), or None and why not."""
        if not os.path.isdir(ROOT):
            return None, f"no cgroup v1 memory controller at {ROOT}"
        path = os.path.join(ROOT, f"hf-flexoffload-{name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
        except OSError as err:
            return None, f"cannot make a memory cgroup under {ROOT} ({err.strerror}; needs root)"
        with contextlib.suppress(OSError):  # pages allocated before joining move too (old kernels)
            _write(path, "memory.move_charge_at_immigrate", "3")
        return cls(path, budget), ""

    def join(self) -> int:
        """Move this process into the cgroup and set the limit to its usage now plus the
        budget; returns that usage (the baseline)."""
        _write(self.path, "cgroup.procs", str(os.getpid()))
        baseline = self.usage()
        _write(self.path, "memory.limit_in_bytes", str(baseline + self.budget))
        _write(self.path, "memory.max_usage_in_bytes", "0")  # the peak window starts here
        return baseline

    def usage(self) -> int:
        return _read_int(self.path, "memory.usage_in_bytes")

    def peak(self) -> int:
        """The most the cgroup has used (heap, page cache, mapped files) since ``join``."""
        return _read_int(self.path, "memory.max_usage_in_bytes")

    def limit(self) -> int:
        return _read_int(self.path, "memory.limit_in_bytes")

    def oom_kills(self) -> int:
        """Processes of the cgroup the OOM killer killed (0 where the kernel does not say)."""
        with open(os.path.join(self.path, "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> None:
        """Move any processes left back to the root cgroup, then remove the cgroup."""
        if not os.path.isdir(self.path):
            return
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:  # busy: a process is still in it, or pages are being uncharged
                for pid in _read(self.path, "cgroup.procs").split():
                    with contextlib.suppress(OSError):  # it exited meanwhile
                        _write(ROOT, "cgroup.procs", pid)
                time.sleep(0.1)
        os.rmdir(self.path)


def run_in_cgroup(name: str, budget: int, fn: Callable, *args) -> tuple[Any, int]:
    """``fn(*args)`` in a fresh process inside a new cgroup of ``budget`` bytes (above the
    process's baseline), after dropping the page cache, so the run starts cold.

    Returns:
        ``fn``'s result and the cgroup's peak usage (page cache included).

    Raises:
        RuntimeError: no cgroup could be made (the reason), ``fn`` raised, or the process died
            (saying whether the OOM killer killed it).
    """
    cgroup, why = MemoryCgroup.make(name, budget)
    if cgroup is None:
        raise RuntimeError(why)
    try:
        drop_page_cache()
        try:
            out = in_fresh_process(fn, *args, cgroup=cgroup)
        except ChildDied as err:
            killed = "killed by the OOM killer, no error first: " if cgroup.oom_kills() else ""
            raise RuntimeError(f"{killed}{err}") from None
        return out, cgroup.peak()
    finally:
        cgroup.remove()


def drop_page_cache() -> str:
    """Write dirty pages out and empty the page cache; returns "" or why it could not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError as err:
        return f"cannot drop the page cache ({err.strerror}; needs root)"
    return ""


def _write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def _read(path: str, name: str) -> str:
    with open(os.path.join(path, name)) as f:
        return f.read()


def _read_int(path: str, name: str) -> int:
    return int(_read(path, name).strip())
