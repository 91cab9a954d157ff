"""The roofline's measured rates, taken in the benchmark's own run: the disk's cold read rate on
the checkpoint's files and the matmul rates of a layer at exactly the row counts that ran."""

from __future__ import annotations

import os
import time

import torch
from _cgroup import drop_page_cache

from hf_flexoffload.architectures.opt import OPTShape


def cold_read_rate(files: list[str], nbytes: int, chunk: int = 64 << 20, depth: int = 4) -> float:
    """Bytes/s of ``O_DIRECT`` reads of ``chunk`` bytes, ``depth`` in flight, over the first
    ``nbytes`` of ``files`` after dropping the page cache: the disk's cold rate at its best."""
    from concurrent.futures import ThreadPoolExecutor

    from hf_flexoffload.storage.transfer import PAGE, aligned_empty

    drop_page_cache()
    largest = max(os.path.getsize(p) for p in files)
    chunk = max(PAGE, min(chunk, largest // PAGE * PAGE))  # small (test) checkpoints
    jobs = []
    for path in files:
        size = os.path.getsize(path) // chunk * chunk
        jobs += [(path, off) for off in range(0, size, chunk)]
    jobs = jobs[: max(1, nbytes // chunk)]
    fds = {p: os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for p in {j[0] for j in jobs}}
    buffers = [aligned_empty((chunk,), torch.uint8) for _ in range(depth)]

    def read(i: int) -> int:
        path, off = jobs[i]
        return os.preadv(fds[path], [memoryview(buffers[i % depth].numpy())], off)

    start = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        done = 0
        for first in range(0, len(jobs), depth):  # a buffer is reused only after its read
            done += sum(pool.map(read, range(first, min(len(jobs), first + depth))))
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return done / seconds


def matmul_rates(shape: OPTShape, dtype: torch.dtype, rows: set[int]) -> dict[int, float]:
    """FLOP/s of one OPT decoder layer's six matmuls at exactly these row counts (the library's
    profile skips row counts whose timing would take too long: the roofline needs them)."""
    h, f = shape.hidden, shape.ffn
    return layer_matmul_rates([(h, h)] * 4 + [(f, h), (h, f)], dtype, rows)


def layer_matmul_rates(
    matrices: list[tuple[int, int]], dtype: torch.dtype, rows: set[int]
) -> dict[int, float]:
    """FLOP/s of a layer's matmuls, ``matrices`` as (out, in) features, at these row counts."""
    import torch.nn.functional as F

    from hf_flexoffload.planning.probe_timing import timed

    layer = [(torch.randn(o, i) * 0.02).to(dtype) for o, i in matrices]
    flops_per_row = 2 * sum(w.numel() for w in layer)
    out = {}
    for n in sorted(rows):
        x = {d: torch.randn(n, d).to(dtype) for d in {i for _, i in matrices}}
        seconds = timed(
            lambda x=x: [F.linear(x[w.shape[1]], w) for w in layer], torch.device("cpu"), 2
        )
        out[n] = n * flops_per_row / seconds
    return out
