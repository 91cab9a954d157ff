"""transfer: inline idle tasks, exact-size pinned buffers, the staging ring."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from hf_flexoffload.storage.transfer import (
    PAGE,
    Mover,
    PinnedHost,
    StagingRing,
    host_empty,
    pinned_host_empty,
)

from ..conftest import FakeDriver

CPU = torch.device("cpu")


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "inline"])
def test_idle_tasks_run_inline_and_busy_ones_in_the_background(overlap):
    mover = Mover(CPU, overlap=overlap)
    try:
        main = threading.current_thread()
        idle = mover.read(threading.current_thread, idle=True).wait()
        busy = mover.read(threading.current_thread).wait()
        weights = mover.read_weights(threading.current_thread).wait()
        assert idle is main
        assert (busy is main) is not overlap
        assert (weights is main) is not overlap
    finally:
        mover.close()


@pytest.mark.parametrize("phase", [0, 8, 1000], ids=["aligned", "phase8", "phase1000"])
def test_pinned_host_registers_exact_whole_pages_inside_its_allocation(phase):
    driver = FakeDriver()
    pinned = PinnedHost(CPU, register=driver.register, unregister=driver.unregister)
    shapes = [(3, 5), (PAGE + 1,), (2 * PAGE // 4,)]
    tensors = [pinned.empty(s, torch.float32, phase) for s in shapes]
    for t in tensors:
        assert t.data_ptr() % PAGE == phase
        t.fill_(1.0)  # writable over its whole length
    # Exactly the pages the data touches: no power-of-two rounding, nothing kept after release.
    expected = sum(-(-(phase + t.numel() * 4) // PAGE) * PAGE for t in tensors)
    assert pinned.pinned_bytes == sum(driver.live.values()) == expected
    pinned.release(tensors[0])
    assert len(driver.live) == 2
    pinned.release()
    assert driver.live == {} and pinned.pinned_bytes == 0


@pytest.mark.parametrize("phase", [0, 8, 1000], ids=["aligned", "phase8", "phase1000"])
def test_pinned_host_tensor_storage_is_exactly_the_registered_range(phase):
    """``is_pinned()`` asks the driver about the storage's first byte: the storage must start
    where the registration does (a page boundary) and cover exactly the registered pages."""
    driver = FakeDriver()
    pinned = PinnedHost(CPU, register=driver.register, unregister=driver.unregister)
    for shape in [(3, 5), (PAGE + 1,), (2 * PAGE // 4,)]:
        t = pinned.empty(shape, torch.float32, phase)
        storage = t.untyped_storage()
        assert storage.data_ptr() % PAGE == 0 and storage.data_ptr() in driver.live
        assert storage.nbytes() == driver.live[storage.data_ptr()]
        assert t.data_ptr() - storage.data_ptr() == phase
    pinned.release()
    assert driver.live == {}


def test_pinned_host_disabled_or_on_cpu_pins_nothing():
    driver = FakeDriver()
    off = PinnedHost(CPU, enabled=False, register=driver.register, unregister=driver.unregister)
    t = off.empty((1024,), torch.float16)
    assert t.shape == (1024,) and driver.live == {} and off.pinned_bytes == 0
    assert not PinnedHost(CPU).active  # a CPU device with the real driver: plain memory


def test_staging_ring_reuses_its_buffers_in_turn():
    driver = FakeDriver()
    ring = StagingRing(PinnedHost(CPU, register=driver.register, unregister=driver.unregister))
    first = ring.take((64, 32), torch.float32, phase=128)
    ring.copied()
    second = ring.take((64, 32), torch.float32)
    ring.copied()
    third = ring.take((16, 32), torch.float32, phase=128)  # slot 0 again, smaller: no new buffer
    ring.copied()
    assert first.data_ptr() % PAGE == 128 and third.data_ptr() == first.data_ptr()
    assert second.data_ptr() != first.data_ptr()
    assert len(driver.live) == 2
    grown = ring.take((4096, 32), torch.float32)  # slot 1, larger: replaced, old one unpinned
    assert grown.numel() == 4096 * 32 and len(driver.live) == 2
    ring.close()
    assert driver.live == {} and ring.nbytes == 0


def test_host_empty_pins_only_when_asked_on_cuda():
    assert not host_empty((8,), torch.float32, CPU, pin=True).is_pinned()
    big = host_empty((1 << 20,), torch.uint8, CPU)
    assert big.data_ptr() % PAGE == 0  # large host buffers are page-aligned for direct reads


def test_pinned_host_empty_registers_its_own_pages_until_the_last_view_is_gone():
    """The host-tier KV cache: exactly its pages registered (no power-of-two rounding), the
    storage starting where the registration does, unregistered once nothing uses it."""
    driver = FakeDriver()
    t = pinned_host_empty((PAGE // 2 + 1,), torch.float16, CPU, driver.register, driver.unregister)
    storage = t.untyped_storage()
    assert driver.live == {storage.data_ptr(): 2 * PAGE} and t.data_ptr() == storage.data_ptr()
    t.fill_(1.0)
    view = t[1:].view(torch.int16)
    del t, storage
    gc.collect()
    assert len(driver.live) == 1  # a view still uses it
    del view
    gc.collect()
    assert driver.live == {}
    assert not pinned_host_empty((8,), torch.float32, CPU).is_pinned()  # CPU: plain memory


def test_pinned_host_empty_falls_back_to_plain_memory_when_pinning_is_refused(caplog):
    """A limit on page-locked memory (ulimit -l) slows the KV cache's uploads, never fails."""

    def refuse(address, nbytes):
        raise RuntimeError("Pinning 8192 bytes of host memory failed (cudaError 2).")

    def unregister(address):
        raise AssertionError("nothing was registered")

    t = pinned_host_empty((2048,), torch.float32, CPU, refuse, unregister)
    t.fill_(2.0)
    assert t.shape == (2048,) and "Left unpinned" in caplog.text
    del t
    gc.collect()
