"""Shared pieces of the benchmark scripts: one run per fresh process, RSS, doc markers."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
from collections.abc import Callable

from hf_flexoffload import Policy


def rss() -> int:
    """Resident bytes of this process now."""
    return _status("VmRSS:")


def peak_rss() -> int:
    """Peak resident bytes of this process (since start or the last ``reset_peak_rss``)."""
    return _status("VmHWM:")


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class AnonPeak:
    """Peak anonymous RSS (heap, not page cache or mapped files) above this process's RSS when
    created, sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.peak = self.baseline = _status("RssAnon:")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon:"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon:")) - self.baseline


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _child(fn: Callable, args: tuple, queue, cgroup) -> None:
    try:
        if cgroup is not None:
            cgroup.join()
        queue.put(("ok", fn(*args)))
    except BaseException as err:  # report it to the parent instead of hanging it
        queue.put(("error", f"{type(err).__name__}: {err}"))


class ChildDied(RuntimeError):
    """The fresh process ended without an answer (e.g. the OOM killer)."""


def in_fresh_process(fn: Callable, *args, cgroup=None):
    """``fn(*args)`` in a spawned process, so its memory and caches are its own; inside
    ``cgroup`` (a ``_cgroup.MemoryCgroup``, joined before ``fn`` runs) when given.

    Raises:
        RuntimeError: ``fn`` raised (the message is its error).
        ChildDied: the process ended without an answer (killed; its exit code is given).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(fn, args, queue, cgroup))
    child.start()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                child.join()
                raise ChildDied(f"the run's process died with exit code {child.exitcode}") from None
    child.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def write_between_markers(path: str, start: str, end: str, text: str) -> None:
    """Replace what lies between ``start`` and ``end`` in ``path`` (atomically)."""
    with open(path) as f:
        doc = f.read()
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")
    os.replace(tmp, path)


def describe_policy(policy: dict) -> str:
    """A policy in one short line: block shape, device/host/disk percentages, options."""
    p = Policy.from_dict(policy)
    parts = [f"{p.micro_batch_size}x{p.num_micro_batches}"]
    for kind in ("weights", "cache", "activations"):
        split = getattr(p, kind)
        parts.append(f"{kind[0]} " + "/".join(f"{100 * f:.0f}" for f in split.fractions))
    flags = {
        "4-bit w": p.compress_weights,
        "4-bit kv": p.compress_cache,
        "O_DIRECT": p.direct_io,
        "no overlap": not p.overlap,
    }
    return ", ".join(parts + [name for name, on in flags.items() if on])


def tokens_bar_chart(
    labels: list[str], values: list[float], ours: list[bool], path: str, digits: int = 2
) -> None:
    """A horizontal bar chart of tokens/s, ours in orange, the others grey (a PNG for docs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.55 * len(values)))
    ax.barh(range(len(values)), values, color=["#d62" if o else "#888" for o in ours])
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s (higher is better)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.{digits}f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
