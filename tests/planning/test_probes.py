"""The probes' arithmetic (on CPU, with fake timings) and, on a CUDA device, the overlap probe."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from hf_flexoffload.planning import overlap_probe, probe_timing, probes
from hf_flexoffload.planning.overlap_probe import (
    MAX_GEMM_REPS,
    MAX_OVERLAP_PENALTY,
    calibrated_reps,
    overlap_penalty,
    settle_penalty,
)
from hf_flexoffload.storage.disk_file import DiskFile


@pytest.mark.parametrize(
    "compute_s, transfer_s, both_s, expected",
    [
        (2.0, 3.0, 3.0, 0.0),  # together as long as the longer: perfect overlap
        (2.0, 3.0, 5.0, 1.0),  # the sum: run in turn
        (3.0, 2.0, 4.0, 0.5),  # half the shorter still adds, whichever side is shorter
        (2.0, 2.0, 6.0, 2.0),  # they slow each other
    ],
    ids=["overlapped", "serialized", "half", "slower"],
)
def test_overlap_penalty_from_three_timings(compute_s, transfer_s, both_s, expected):
    assert overlap_penalty(compute_s, transfer_s, both_s) == pytest.approx(expected)


def test_an_empty_task_has_no_penalty():
    assert overlap_penalty(0.0, 3.0, 3.5) == 0.0


@pytest.mark.parametrize(
    "penalties, expected",
    [
        ([0.9, 0.1, 0.4, 5.0, 0.3], 0.4),  # the median: one noisy round does not count
        ([-0.2, -0.1, 0.3], 0.0),  # faster together than the longer alone (noise): 0
        ([3.0, 2.5, 0.5], MAX_OVERLAP_PENALTY),
    ],
    ids=["median", "clamped-low", "clamped-high"],
)
def test_rounds_settle_on_a_clamped_median(penalties, expected):
    assert settle_penalty(penalties) == expected


@pytest.mark.parametrize("transfer_s, gemm_s", [(5e-3, 1e-4), (3e-2, 7e-4), (1e-3, 3e-4)])
def test_calibrated_gemms_take_as_long_as_a_transfer(transfer_s, gemm_s):
    reps = calibrated_reps(transfer_s, gemm_s)
    assert abs(reps * gemm_s - transfer_s) <= gemm_s / 2


@pytest.mark.parametrize(
    "transfer_s, gemm_s, expected",
    [(1e-6, 1e-3, 1), (10.0, 1e-6, MAX_GEMM_REPS), (1e-3, 0.0, MAX_GEMM_REPS)],
    ids=["at-least-one", "bounded", "unmeasurable-gemm"],
)
def test_calibration_is_bounded(transfer_s, gemm_s, expected):
    assert calibrated_reps(transfer_s, gemm_s) == expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_short_kernels_are_timed_back_to_back_on_cuda(monkeypatch, device):
    # A fake clock that advances one second per call: the result is seconds per call either way,
    # but on CUDA from _CUDA_CALLS calls per synchronize (each call alone would time the sync).
    clock = types.SimpleNamespace(now=0.0, perf_counter=lambda: clock.now)
    syncs = []
    monkeypatch.setattr(probe_timing, "time", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    calls = []

    def op() -> None:
        calls.append(1)
        clock.now += 1.0

    assert probe_timing.timed_each(op, torch.device(device)) == pytest.approx(1.0)
    per_sync = probe_timing.CUDA_CALLS if device == "cuda" else 1
    assert len(calls) == 6 * per_sync  # a warm-up and five timed runs
    assert len(syncs) == (6 if device == "cuda" else 0)


class _FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append(("wait", self.name, event.stream))


def test_cuda_overlap_probe_orders_copies_after_compute(monkeypatch, tmp_path):
    """The CUDA probe's bookkeeping, run on CPU tensors with torch.cuda's streams and events
    faked: every copy of the overlapped run waits on an event of the compute stream, the
    compute stream on one of the side stream, and the penalty is in range."""
    log: list = []

    class Event:
        def __init__(self) -> None:
            self.stream = None

        def record(self, stream) -> None:
            self.stream = stream.name

        def synchronize(self) -> None:
            log.append(("sync", self.stream))

    compute = _FakeStream("compute", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    f = DiskFile(str(tmp_path / "probe"), create=True)
    try:
        f.write(0, torch.zeros(4 * 2**20, dtype=torch.uint8))
        penalty = overlap_probe._cuda_overlap_penalty(
            f, torch.device("cpu"), torch.float32, (1024, 256), None
        )
    finally:
        f.close()
    assert 0.0 <= penalty <= MAX_OVERLAP_PENALTY
    waits = [entry for entry in log if entry[0] == "wait"]
    assert {w[1:] for w in waits} == {("side", "compute"), ("compute", "side")}
    assert ("sync", "side") in log, "staging buffers are reused only after their copy"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_overlap_probe_measures_a_penalty(tmp_path, dtype):
    rates = probes._disk(str(tmp_path), torch.device("cuda", 0), dtype, (1024, 4096))
    assert 0.0 <= rates["overlap_penalty"] <= MAX_OVERLAP_PENALTY
    direct = rates["direct_overlap_penalty"]
    assert direct is None or 0.0 <= direct <= MAX_OVERLAP_PENALTY
    assert not list(tmp_path.iterdir()), "the probe file is removed"


def test_slow_matmul_row_counts_reuse_the_last_measured_rate(monkeypatch):
    # A call predicted to take longer than MATMUL_CALL_SECONDS is not timed (a 13B layer in
    # bf16 on an AVX2 CPU would take minutes per row count): its rate is the last measured one.
    calls = []

    def fake_timed(fn, device, repeats=5):
        calls.append(repeats)
        return 0.1 * len(calls)  # seconds: later (larger) row counts are slower

    monkeypatch.setattr(probes, "timed", fake_timed)
    monkeypatch.setattr(probes, "MATMUL_CALL_SECONDS", 1e-9)  # only the first row count runs
    rates = probes._matmul(torch.device("cpu"), torch.float32, (8, 16))
    assert len(calls) == 1
    assert list(rates) == list(probes.MATMUL_ROWS)
    assert len(set(rates.values())) == 1

    calls.clear()
    monkeypatch.setattr(probes, "MATMUL_CALL_SECONDS", 1e9)  # every row count is timed
    rates = probes._matmul(torch.device("cpu"), torch.float32, (8, 16))
    assert len(calls) == len(probes.MATMUL_ROWS)
    assert len(set(rates.values())) > 1
