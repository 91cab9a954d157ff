from __future__ import annotations

import json
import logging
import os
import tempfile

import pytest
import torch

from hf_flexoffload import HardwareProfile
from hf_flexoffload.planning.overlap_probe import MAX_OVERLAP_PENALTY
from hf_flexoffload.storage.disk_file import direct_io_supported


def make_profile(**overrides) -> HardwareProfile:
    """A synthetic profile: rates of a small CPU machine, capacities in bytes."""
    values = dict(
        device="cpu",
        device_name="test cpu",
        dtype="float32",
        shared=True,
        device_memory=8 * 2**30,
        host_memory=8 * 2**30,
        disk_space=100 * 2**30,
        ram_available=8 * 2**30,
        host_to_device=10e9,
        device_to_host=10e9,
        disk_read=1e9,
        disk_write=1e9,
        cached_disk_read=8e9,
        matmul_flops={1: 10e9, 16: 50e9, 256: 100e9},
        attention_bytes=10e9,
        device_attention_bytes=10e9,
        dequantize_bytes=2e9,
        op_seconds=5e-6,
        overlap_penalty=0.5,
        matrix=(64, 128),
    )
    values.update(overrides)
    return HardwareProfile(**values)


# Capacities are read at every run; only the measured rates are cached.
CAPACITIES = ("device_memory", "host_memory", "disk_space", "ram_available", "shared")


def seed_profile(
    cache: str | os.PathLike,
    probe_dir: str | os.PathLike,
    matrix: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> dict:
    """Cache a synthetic profile's rates under ``cache`` (``$HF_FLEXOFFLOAD_CACHE``) where
    ``HardwareProfile.measure`` looks them up for ``probe_dir``'s filesystem, so nothing is
    measured (minutes for a large shape, or bf16 on an AVX2 CPU). ``overrides``: e.g. the
    ``matmul_flops`` that make one dtype win."""
    from hf_flexoffload.planning import hardware

    rates = make_profile(matrix=matrix, dtype=str(dtype).removeprefix("torch."), **overrides)
    rates = rates.to_dict()
    for name in CAPACITIES:
        rates.pop(name)
    key = hardware._machine_key(torch.device("cpu"), dtype, matrix, str(probe_dir))
    hardware._write_cached(os.path.join(cache, "profiles", key), rates)
    return rates


def test_json_round_trip():
    profile = make_profile()
    again = HardwareProfile.from_json(profile.to_json())
    assert again == profile
    assert json.loads(profile.to_json())["matmul_flops"] == {"1": 10e9, "16": 50e9, "256": 100e9}


@pytest.mark.parametrize(
    "field, value",
    [
        ("disk_read", -1.0),
        ("matmul_flops", {}),
        ("overlap_penalty", 2.5),
        ("direct_overlap_penalty", -0.1),
    ],
    ids=["negative", "no-matmul", "penalty-above-2", "negative-direct-penalty"],
)
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        make_profile(**{field: value})


def test_direct_penalty_round_trips_and_applies_to_direct_policies():
    profile = make_profile(direct_overlap_penalty=0.25)
    assert HardwareProfile.from_json(profile.to_json()) == profile
    assert profile.penalty_for(True) == 0.25 and profile.penalty_for(False) == 0.5
    assert make_profile().penalty_for(True) == 0.5, "no O_DIRECT measured: the cached one"


def test_unknown_json_fields_are_rejected():
    data = make_profile().to_dict()
    data["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        HardwareProfile.from_dict(data)


@pytest.mark.parametrize(
    "rows, expected",
    [(1, 10e9), (16, 50e9), (256, 100e9), (4096, 100e9), (4, (10e9**0.5) * (50e9**0.5))],
    ids=["first", "middle", "last", "beyond", "interpolated"],
)
def test_matmul_rate_interpolates_in_log_space(rows, expected):
    assert make_profile().matmul_rate(rows) == pytest.approx(expected)


def test_max_memory_caps_shared_ram_and_disk():
    capped = make_profile().with_caps({"host": "1GiB", "disk": "2GiB"})
    assert (capped.device_memory, capped.host_memory, capped.disk_space) == (
        2**30,
        2**30,
        2 * 2**30,
    )
    assert capped.ram_available == 8 * 2**30  # the page cache is the OS's, not capped


def test_measure_caches_rates_but_reads_capacities_again(tmp_path, caplog):
    kwargs = dict(offload_dir=str(tmp_path), matrix=(64, 128), cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="hf_flexoffload.planning.hardware"):
        first = HardwareProfile.measure("cpu", torch.float32, **kwargs)
    # The first measurement says what it does and how long it takes; a cached one says nothing.
    (notice,) = [r.getMessage() for r in caplog.records if "Measuring" in r.getMessage()]
    assert "Measuring this machine once for cpu float32 (matmuls at 64x128" in notice
    assert "30 s to 2 min" in notice
    caplog.clear()
    files = os.listdir(tmp_path / "c")
    assert len(files) == 1 and files[0].startswith("cpu-float32-")
    assert all(rate > 0 for rate in first.matmul_flops.values())
    assert first.disk_read > 0 and first.cached_disk_read > 0 and first.dequantize_bytes > 0
    assert 0.0 <= first.overlap_penalty <= MAX_OVERLAP_PENALTY
    if direct_io_supported(str(tmp_path)):
        assert 0.0 <= first.direct_overlap_penalty <= MAX_OVERLAP_PENALTY
    assert first.penalty_for(False) == first.overlap_penalty
    # Whether bf16 is fast depends on the instruction set: the summary says which one it is.
    assert first.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert f"CPU capability {first.cpu_capability}" in first.describe()
    assert "compute dtype float32" in first.describe()
    again = HardwareProfile.measure("cpu", torch.float32, max_memory={"host": 10**9}, **kwargs)
    assert again.matmul_flops == first.matmul_flops  # from the cache
    assert not [r for r in caplog.records if "Measuring" in r.getMessage()]
    assert again.host_memory == again.device_memory == 10**9
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hf_flexoffload-disk-probe")]


def test_cuda_device_name_uses_torch_cuda(monkeypatch):
    # Runs on CPU: the CUDA branch only asks torch.cuda for the name (issue 19's crash).
    from hf_flexoffload.planning import probes

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"fake GPU {device}")
    assert probes.device_name(torch.device("cuda", 0)) == "fake GPU cuda:0"


def test_a_profile_planned_before_offload_dir_exists_is_the_one_found_after(tmp_path, monkeypatch):
    """Planning runs before loading creates ``offload_dir``: the probe measures (and the cache
    key names) the filesystem the directory will be on, not the temporary directory's."""
    from hf_flexoffload.planning import hardware
    from hf_flexoffload.planning.budget import probe_directory

    elsewhere = tmp_path / "tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # /tmp on another filesystem
    later = tmp_path / "offload" / "run-1"
    assert probe_directory(str(later)) == str(tmp_path)
    assert probe_directory(str(tmp_path)) == str(tmp_path)
    assert probe_directory(None) == str(elsewhere)

    class Probed(Exception):
        pass

    def measure_rates(device, dtype, matrix, probe_dir):
        raise Probed(probe_dir)

    monkeypatch.setattr(hardware, "measure_rates", measure_rates)
    kwargs = dict(matrix=(64, 128), cache_dir=str(tmp_path / "c"))
    with pytest.raises(Probed) as probed:
        HardwareProfile.measure("cpu", torch.float32, offload_dir=str(later), **kwargs)
    assert probed.value.args[0] == str(tmp_path)
    seed_profile(tmp_path, tmp_path, (64, 128))  # what a measurement with the directory cached
    HardwareProfile.measure(
        "cpu",
        torch.float32,
        offload_dir=str(later),
        cache_dir=str(tmp_path / "profiles"),
        matrix=(64, 128),
    )  # found: nothing measured
