"""Benchmarks' honest budgets: a run in a memory cgroup is held to its budget, page cache
included, and a run the kernel kills is reported, not waited on forever."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


MiB = 2**20


def _allocate(nbytes: int) -> int:
    block = bytearray(nbytes)  # zero-filled: every page is touched
    return len(block)


def _read_file(path: str) -> int:
    with open(path, "rb") as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(MiB), b""))


def _exit(code: int) -> None:
    os._exit(code)


@pytest.fixture
def common():
    """``_common`` as it is in ``sys.modules`` now: other benchmark tests drop and re-import it,
    and a child's function pickles by the module of that name."""
    import _common

    return _common


def test_a_process_that_dies_without_an_answer_is_reported(common):
    with pytest.raises(common.ChildDied, match="exit code 3"):
        common.in_fresh_process(_exit, 3)


@pytest.fixture
def cgroup():
    from _cgroup import MemoryCgroup

    group, why = MemoryCgroup.make("test", 64 * MiB)
    if group is None:
        pytest.skip(why)
    yield group
    group.remove()
    assert not os.path.exists(group.path)


def test_within_the_budget_runs_and_reports_its_peak(cgroup, common):
    assert common.in_fresh_process(_allocate, 16 * MiB, cgroup=cgroup) == 16 * MiB
    assert 16 * MiB <= cgroup.peak() <= cgroup.limit()


def test_over_the_budget_the_kernel_kills_and_we_say_so(cgroup, common):
    with pytest.raises(common.ChildDied):
        common.in_fresh_process(_allocate, 256 * MiB, cgroup=cgroup)
    assert cgroup.oom_kills() >= 1


def test_the_page_cache_counts_but_is_reclaimed_not_killed(cgroup, common, tmp_path):
    # A file four times the budget read through the page cache: the cache it fills is charged
    # to the cgroup and dropped under its limit; nothing is killed.
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
    assert common.in_fresh_process(_read_file, str(path), cgroup=cgroup) == 256 * MiB
    assert cgroup.peak() <= cgroup.limit() and cgroup.oom_kills() == 0
