"""How well reading weights overlaps with compute: the overlap penalty the cost model charges.

The probe runs the runtime's own pattern on a probe file: on CPU a thread reads the next weight
matrix into one staging buffer while matmuls run on the other; on CUDA the read lands in pinned
staging and is copied to the device on a side stream while GEMMs run on the compute stream.
Compute and transfer are timed alone, then together.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..storage.disk_file import DiskFile
from ..storage.transfer import PAGE, PinnedHost, aligned_empty
from .probe_timing import timed, timed_each

logger = logging.getLogger(__name__)

# Above 1 the threads slow each other; capped so one noisy probe cannot dominate the model.
MAX_OVERLAP_PENALTY = 2.0
# The CUDA overlap probe's GEMMs: at most this many input rows (enough that a GEMM is GPU time,
# not launch overhead, so the host thread stays free to hand over reads as in the runtime) ...
_CUDA_GEMM_ROWS = 2048
# ... and at most this many per step, bounding the probe's time when transfers are very slow.
MAX_GEMM_REPS = 4096


def overlap_penalty(compute_s: float, transfer_s: float, both_s: float) -> float:
    """How much of the shorter of two tasks still adds when both run at once: 0 when together
    they take as long as the longer alone (perfect overlap), 1 when they take the sum (none),
    above 1 when they slow each other. Not clamped: rounds are combined by ``settle_penalty``."""
    shorter = min(compute_s, transfer_s)
    if shorter <= 0:
        return 0.0  # an empty task has nothing to hide
    return (both_s - max(compute_s, transfer_s)) / shorter


def settle_penalty(penalties: Sequence[float]) -> float:
    """The median of rounds' penalties (interference on a shared machine comes and goes: the
    median of rounds that each time all three is steadier than a ratio of separately taken
    minimums), within ``[0, MAX_OVERLAP_PENALTY]``."""
    return min(MAX_OVERLAP_PENALTY, max(0.0, statistics.median(penalties)))


def calibrated_reps(target_s: float, op_s: float, max_reps: int = MAX_GEMM_REPS) -> int:
    """How many runs of an op taking ``op_s`` take about ``target_s`` (1 to ``max_reps``)."""
    if op_s <= 0:
        return max_reps
    return max(1, min(max_reps, round(target_s / op_s)))


def measure_overlap(
    f: DiskFile,
    device: torch.device,
    dtype: torch.dtype,
    matrix: tuple[int, int],
    max_steps: int | None = None,
) -> float:
    """The schedule's pattern: a thread reads the next weight matrix from an offload file (cached,
    or direct when ``f`` reads with O_DIRECT) into one staging buffer while matmuls run on the
    other. Compute and reads are timed alone, then together: ``overlap_penalty``."""
    cols = matrix[0]
    itemsize = dtype.itemsize
    # A layer-sized matrix (at least 16 MiB: the runtime never reads in smaller pieces than a
    # tensor, and tiny reads would time thread hand-offs), at most half the file.
    rows = max(matrix[1], -(-16 * 2**20 // (cols * itemsize)))
    rows = max(1, min(rows, _file_bytes(f) // 2 // (cols * itemsize)))
    if device.type == "cuda":
        return _cuda_overlap_penalty(f, device, dtype, (rows, cols), max_steps)
    staging = [aligned_empty((rows, cols), dtype).zero_() for _ in range(2)]  # (out, in) host
    nbytes = rows * cols * itemsize
    chunks = _file_bytes(f) // nbytes
    steps = 2 * chunks if max_steps is None else min(2 * chunks, max_steps)
    on_device = [t.to(device) for t in staging]  # the same tensors on CPU

    def read(i: int) -> None:
        f.read_into((i % chunks) * nbytes, staging[i % 2])

    # Up to 64 rows, fewer where a step's matmul would take far longer than its read (bf16 on
    # an AVX2 CPU: minutes of probing for a penalty that only weighs the shorter task).
    one_row = timed(lambda: F.linear(torch.ones(1, cols, dtype=dtype), on_device[0]), device, 1)
    rows = calibrated_reps(timed(lambda: read(0), torch.device("cpu"), 1), one_row, 64)
    x = torch.randn(rows, cols, device=device).to(dtype)

    def compute(i: int) -> None:
        F.linear(x, on_device[i % 2])

    def together() -> None:
        with ThreadPoolExecutor(1) as reader:
            for i in range(steps):
                pending = reader.submit(read, i + 1)  # the next matrix, into the other buffer
                compute(i)
                pending.result()

    penalties = []
    for _ in range(5):
        compute_s = timed(_in_turn(compute, steps), device, 1)
        read_s = timed(_in_turn(read, steps), torch.device("cpu"), 1)
        both_s = timed(together, device, 1)
        penalties.append(overlap_penalty(compute_s, read_s, both_s))
    return settle_penalty(penalties)


def _cuda_overlap_penalty(
    f: DiskFile,
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int],
    max_steps: int | None,
) -> float:
    """The runtime's CUDA weight path (``Mover``, ``StagingRing``) against GEMMs on the compute
    stream: a thread reads the next (out, in) matrix from ``f`` into a pinned staging buffer and
    copies it to the device on a side stream, which first waits (an event) for the compute
    enqueued before, while the compute stream multiplies by the current one. The GEMMs per step
    are calibrated to take about as long as a transfer, so the penalty weighs both sides
    (microseconds of compute against milliseconds of reads would divide noise by nothing)."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    stride = -(-nbytes // PAGE) * PAGE  # page-aligned offsets: direct reads land in place
    chunks = _file_bytes(f) // stride
    steps = 2 * chunks if max_steps is None else min(2 * chunks, max_steps)
    pinned = PinnedHost(device)
    try:
        staging = [pinned.empty(shape, dtype).zero_() for _ in range(2)]
        weights = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
        x = torch.randn(min(_CUDA_GEMM_ROWS, max(64, shape[1])), shape[1], device=device)
        x = x.to(dtype)  # at most as many rows as the weights: outputs no larger than them
        side, compute_stream = torch.cuda.Stream(device), torch.cuda.current_stream(device)
        copied: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each

        def transfer(i: int, after: torch.cuda.Event | None = None) -> torch.cuda.Event:
            k = i % 2
            if copied[k] is not None:
                copied[k].synchronize()  # refill a staging buffer only once its copy has run
            f.read_into((i % chunks) * stride, staging[k])
            with torch.cuda.stream(side):
                if after is not None:
                    side.wait_event(after)  # the compute reading weights[k] was enqueued before
                weights[k].copy_(staging[k], non_blocking=True)
            done = copied[k] = torch.cuda.Event()
            done.record(side)
            return done

        def gemms(i: int, reps: int) -> None:
            for _ in range(reps):
                F.linear(x, weights[i % 2])

        transfer_s = timed(lambda: transfer(0), device, 3)
        reps = calibrated_reps(transfer_s, timed_each(lambda: gemms(0, 1), device))

        def together() -> None:
            with ThreadPoolExecutor(1) as reader:
                for i in range(steps):
                    ready = torch.cuda.Event()
                    ready.record(compute_stream)
                    pending = reader.submit(transfer, i + 1, ready)  # into the other buffers
                    gemms(i, reps)
                    # The compute stream (not the host) waits for the next matrix's copy.
                    compute_stream.wait_event(pending.result())

        penalties = []
        for _ in range(5):
            compute_s = timed(_in_turn(lambda i: gemms(i, reps), steps), device, 1)
            transfer_s = timed(_in_turn(transfer, steps), device, 1)
            both_s = timed(together, device, 1)
            penalties.append(overlap_penalty(compute_s, transfer_s, both_s))
        logger.debug("CUDA overlap probe: %d GEMMs a step, penalties %s", reps, penalties)
        return settle_penalty(penalties)
    finally:
        torch.cuda.synchronize(device)  # no copy may still read a buffer about to be unpinned
        pinned.release()


def _in_turn(task: Callable[[int], object], steps: int) -> Callable[[], object]:
    """A call that runs ``task(0)``, ..., ``task(steps - 1)`` one after another."""
    return lambda: [task(i) for i in range(steps)]


def _file_bytes(f: DiskFile) -> int:
    return os.fstat(f.fileno()).st_size
