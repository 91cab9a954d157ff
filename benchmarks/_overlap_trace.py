"""How much of the host-to-device copy time ran while the GPU computed, from a profiler trace.

``torch.profiler`` exports a Chrome trace whose GPU events carry their stream: kernels
(``cat == "kernel"``) and copies (``cat == "gpu_memcpy"``, named ``Memcpy HtoD ...``). The
compute stream is the one with the most kernels; a copy overlaps compute for as long as any
kernel runs on that stream during it. Pure functions, so they are tested on hand-made traces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _covered(interval: tuple[float, float], union: list[tuple[float, float]]) -> float:
    """Length of ``interval`` inside the merged ``union``."""
    start, end = interval
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in union)


def overlap_stats(events: list[dict]) -> dict:
    """Copy and compute time of a trace's GPU events, and how much of the copies overlapped.

    Returns:
        ``compute_stream``, ``copy_streams`` (streams with host-to-device copies),
        ``kernels``, ``copies``, ``side_copies`` (copies off the compute stream),
        ``copy_us`` (their total time), ``overlapped_us`` (of it, while a kernel ran on the
        compute stream), ``overlapped_fraction`` (None without side copies).
    """
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    copies = [
        e
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "") and "dur" in e
    ]
    streams = Counter(_stream(e) for e in kernels)
    compute = streams.most_common(1)[0][0] if streams else None
    busy = _union((e["ts"], e["ts"] + e["dur"]) for e in kernels if _stream(e) == compute)
    side = [e for e in copies if _stream(e) != compute]
    copy_us = sum(e["dur"] for e in side)
    overlapped = sum(_covered((e["ts"], e["ts"] + e["dur"]), busy) for e in side)
    return {
        "compute_stream": compute,
        "copy_streams": sorted({str(_stream(e)) for e in copies}),
        "kernels": len(kernels),
        "copies": len(copies),
        "side_copies": len(side),
        "copy_us": copy_us,
        "overlapped_us": overlapped,
        "overlapped_fraction": overlapped / copy_us if copy_us else None,
    }


def _stream(event: dict):
    return event.get("args", {}).get("stream")
