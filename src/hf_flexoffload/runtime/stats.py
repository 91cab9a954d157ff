"""The per-generate summary, built from the run's counters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config.counters import human_bytes
from ..config.policy import Policy
from ..planning.memory_model import Footprint


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """What one ``generate`` call did.

    Attributes:
        prefill_seconds: Time of the first forward (the prompt).
        decode_seconds: Time of all later forwards.
        generated_tokens: New tokens produced, summed over sequences (padding after EOS included,
            as FlexGen counts them: every row of the block runs every step).
        batch_size: Sequences in the block.
        forwards: Number of forward passes (token steps).
        bytes_moved: Bytes per link: disk_to_host, host_to_device, device_to_host, host_to_disk.
        peak_bytes: Peak bytes held per tier by the model's own buffers (weights, KV cache,
            activations, staging).
        policy: The policy the call ran under (re-optimized for the batch with ``"auto"``).
        memory: Where the memory model said the call's bytes would go, item by item, as
            checked against the capacities before the call started.
        routed_experts: Mixture of experts: (layer, expert) pairs the steps routed tokens to,
            summed over steps (0 for a dense model).
        routed_expert_bytes: Stored bytes of those routed experts that were not in compute
            memory (what fetching only the routed experts has to read or copy).
    """

    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int
    batch_size: int
    forwards: int
    bytes_moved: dict[str, int] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    policy: Policy | None = None
    memory: Footprint | None = None
    routed_experts: int = 0
    routed_expert_bytes: int = 0

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """FlexGen's generation throughput: generated tokens / (prefill + decode time)."""
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        data["memory"] = self.memory.to_dict() if self.memory is not None else None
        return data

    def __str__(self) -> str:
        moved = ", ".join(f"{k}={human_bytes(v)}" for k, v in self.bytes_moved.items())
        peak = ", ".join(f"{k}={human_bytes(v)}" for k, v in self.peak_bytes.items())
        return (
            f"{self.generated_tokens} tokens for {self.batch_size} sequences in "
            f"{self.total_seconds:.2f}s (prefill {self.prefill_seconds:.2f}s, decode "
            f"{self.decode_seconds:.2f}s): {self.tokens_per_second:.1f} tok/s; moved {moved}; "
            f"peak {peak}"
        )


class ForwardTimes:
    """Seconds of the forwards of one ``generate`` call, prefill and decode apart, without
    waiting for the device after each forward.

    On the CPU each forward is timed by the wall clock. On CUDA a full device synchronize per
    forward would stall the host, which otherwise enqueues the next step while the GPU still
    runs this one; instead two timing events on the compute stream bracket each forward, and
    their times are read once, when ``totals`` is asked for (at the end of the call, when the
    device has finished anyway).

    Args:
        device: The compute device.
        mark: Records a timing event on the compute stream and returns it (default: a
            ``torch.cuda.Event(enable_timing=True)`` on ``device``'s current stream; tests pass
            fakes).
    """

    def __init__(self, device: torch.device, mark: Callable[[], Any] | None = None) -> None:
        self.device = device
        self.events = device.type == "cuda" or mark is not None
        self._mark = mark or (lambda: _cuda_mark(device))
        self._spans: list[tuple[bool, Any, Any]] = []  # (prefill, start event, end event)
        self.prefill = 0.0
        self.decode = 0.0

    def start(self) -> Any:
        """Mark the start of a forward; hand the mark to ``stop``."""
        return self._mark() if self.events else time.perf_counter()

    def stop(self, started: Any, prefill: bool) -> None:
        """Mark the end of the forward ``started`` marked (everything it enqueued)."""
        if not self.events:
            self._add(prefill, time.perf_counter() - started)
            return
        self._spans.append((prefill, started, self._mark()))

    def totals(self) -> tuple[float, float]:
        """(prefill, decode) seconds so far; on CUDA waits for the last forward's end."""
        if self._spans:
            self._spans[-1][2].synchronize()
            for prefill, start, end in self._spans:
                self._add(prefill, start.elapsed_time(end) / 1000)
            self._spans.clear()
        return self.prefill, self.decode

    def _add(self, prefill: bool, seconds: float) -> None:
        if prefill:
            self.prefill += seconds
        else:
            self.decode += seconds


def _cuda_mark(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event
