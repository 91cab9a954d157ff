"""ForwardTimes: forwards timed without a device synchronize per forward."""

from __future__ import annotations

import pytest
import torch

from hf_flexoffload.runtime.stats import ForwardTimes


class FakeEvent:
    """A timing event at a given device time (ms); counts the host's waits for it."""

    waits = 0

    def __init__(self, at_ms: float) -> None:
        self.at_ms = at_ms

    def synchronize(self) -> None:
        FakeEvent.waits += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at_ms - self.at_ms


def test_events_time_each_forward_and_the_host_waits_once_at_the_end():
    clock = iter([0.0, 500.0, 600.0, 700.0, 700.0, 750.0])  # prefill 0.5 s, decodes 0.1 + 0.05
    times = ForwardTimes(torch.device("cpu"), mark=lambda: FakeEvent(next(clock)))
    FakeEvent.waits = 0
    for prefill in (True, False, False):
        started = times.start()
        times.stop(started, prefill)
    assert FakeEvent.waits == 0  # nothing waited for the device while forwards ran
    assert times.totals() == pytest.approx((0.5, 0.15))
    assert FakeEvent.waits == 1
    assert times.totals() == pytest.approx((0.5, 0.15)) and FakeEvent.waits == 1


def test_the_cpu_is_timed_by_the_wall_clock():
    times = ForwardTimes(torch.device("cpu"))
    started = times.start()
    assert isinstance(started, float)
    times.stop(started, prefill=True)
    prefill, decode = times.totals()
    assert prefill >= 0.0 and decode == 0.0
