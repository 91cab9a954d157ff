"""Timing an operation the way the probes do: the best of a few runs after a warm-up (on a shared
machine noise only ever makes a run slower), with the device synchronized around each."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Kernels timed one at a time on CUDA take microseconds, about what a synchronize costs: timings
# there run this many back to back (the runtime never waits after each).
CUDA_CALLS = 32


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Best seconds of ``fn`` over ``repeats`` after one warm-up call (on a shared machine,
    noise only ever makes a run slower)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def timed_each(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: on CUDA the best of ``CUDA_CALLS`` calls back to back,
    divided (timing a single kernel would time the synchronize after it)."""
    if device.type != "cuda":
        return timed(fn, device)
    return timed(lambda: [fn() for _ in range(CUDA_CALLS)], device) / CUDA_CALLS
