"""Shared by the benchmark tests: a cached hardware profile, so no test measures one."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_flexoffload import hardware

from ..test_hardware import make_profile

# Capacities are read at every run; only the measured rates are cached.
CAPACITIES = ("device_memory", "host_memory", "disk_space", "ram_available", "shared")


def seed_profile(
    cache: Path, work: Path, matrix: tuple[int, int], dtype: torch.dtype = torch.float32
) -> dict:
    """Cache a profile's rates where the benchmark and ours-auto look them up: measuring them
    takes minutes on 2 cores, and tests/test_hardware.py tests measuring."""
    rates = make_profile(matrix=matrix, dtype=str(dtype).removeprefix("torch.")).to_dict()
    for name in CAPACITIES:
        rates.pop(name)
    key = hardware._machine_key(torch.device("cpu"), dtype, matrix, str(work))
    hardware._write_cached(str(cache / "profiles" / key), rates)
    return rates
