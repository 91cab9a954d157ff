"""Shared pieces of the benchmark scripts: one run per fresh process, RSS, doc markers, each
system's compute dtype."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
import time
from collections.abc import Callable

import torch

from hf_flexoffload import HardwareProfile, Policy
from hf_flexoffload.planning.dtype_choice import candidate_dtypes
from hf_flexoffload.planning.load_plan import native_bf16
from hf_flexoffload.storage.tier_store import dtype_name

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


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


def _read_bytes(pid: int) -> int:
    """Bytes process ``pid`` has had read from storage (0 where that is not readable)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration):
        return 0


class ChildDied(RuntimeError):
    """The fresh process ended without an answer (e.g. the OOM killer)."""


def in_fresh_process(fn: Callable, *args, cgroup=None, timeout: float | None = None):
    """``fn(*args)`` in a spawned process, so its memory and caches are its own; inside
    ``cgroup`` (a ``_cgroup.MemoryCgroup``, joined before ``fn`` runs) when given; killed after
    ``timeout`` seconds when given (a run thrashing the page cache may never end).

    Raises:
        RuntimeError: ``fn`` raised (the message is its error).
        ChildDied: the process ended without an answer (killed; its exit code is given), or
            did not answer within ``timeout`` (how much it had read from storage is given).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(fn, args, queue, cgroup))
    child.start()
    started = time.monotonic()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if timeout is not None and time.monotonic() - started > timeout and child.is_alive():
                read = _read_bytes(child.pid)
                child.kill()
                child.join()
                raise ChildDied(
                    f"did not finish within {timeout:.0f} s (killed, having read "
                    f"{read / 2**30:.0f} GiB from storage)"
                ) from None
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


# -- compute dtypes ------------------------------------------------------------------------------


def dtype_profiles(
    requested: str, device: torch.device, offload_dir: str, matrix: tuple[int, int]
) -> dict[str, HardwareProfile]:
    """The hardware profile of every compute dtype a run may use, by name: ``--dtype auto``
    measures the candidates ours measures for ``dtype="auto"`` (fp32 and bf16 on a CPU), a named
    dtype only that one. Ours' runs then find them cached."""
    if requested == "auto":
        has_bf16 = device.type == "cuda" and native_bf16(device)
        names = [dtype_name(d) for d in candidate_dtypes(device.type, has_bf16)]
    else:
        names = [requested]
    return {
        name: HardwareProfile.measure(
            device, getattr(torch, name), offload_dir=offload_dir, matrix=matrix
        )
        for name in names
    }


def fastest_dtype(
    profiles: dict[str, HardwareProfile], batch: int, prompt_len: int, gen_len: int
) -> str:
    """The dtype (of ``profiles``) whose measured matmul rates at the model's shape make a run
    of ``batch`` sequences fastest: a prefill of ``batch * prompt_len`` rows and ``gen_len - 1``
    decode steps of ``batch`` rows (a row's FLOPs are the same in every dtype). Stock
    transformers and accelerate get it: the baselines at their best on this machine."""

    def seconds(profile: HardwareProfile) -> float:
        rows = batch * prompt_len
        return rows / profile.matmul_rate(rows) + (gen_len - 1) * batch / profile.matmul_rate(batch)

    return min(profiles, key=lambda name: seconds(profiles[name]))


def cpu_capability() -> str:
    """The CPU's instruction set as torch uses it (``AVX2``, ``AVX512``...): whether bf16
    matmuls are fast here depends on it, so every report names it."""
    return f"CPU capability {torch.backends.cpu.get_cpu_capability()}"


def dtype_sentence(requested: str) -> str:
    """How a report's systems chose their compute dtypes, and the CPU's instruction set."""
    capability = f"{cpu_capability()}."
    if requested != "auto":
        return f"Every system computes in {requested} (`--dtype {requested}`); {capability}"
    return (
        "Each system at its best compute dtype (`--dtype auto`, the dtype column): ours with "
        '`dtype="auto"` (a profile per candidate dtype, the fastest predicted wins), stock '
        "transformers and accelerate in the dtype whose measured matmul rates at the model's "
        f"shape are faster for that run's batch; {capability}"
    )
