from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split, Workload
from hf_flexoffload.planning.budget import (
    AllocatorState,
    Capacities,
    InsufficientMemoryError,
    device_capacity,
    parse_size,
)

GiB = 2**30
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "text, expected",
    [("12GiB", 12 * 2**30), ("500MB", 500 * 10**6), (1024, 1024), ("1e3", 1000), ("2 kib", 2048)],
    ids=["gib", "mb", "int", "float", "spaced"],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_shared_memory_counts_device_and_host_together():
    caps = Capacities(device=100, host=100, disk=1000, shared=True)
    caps.check({"device": 60, "host": 40}, "ok")
    with pytest.raises(InsufficientMemoryError, match="device\\+host"):
        caps.check({"device": 60, "host": 60}, "too much")


@pytest.mark.parametrize("key", ["device", "host"])
def test_a_cap_on_either_tier_caps_shared_ram(key):
    caps = Capacities(device=100, host=100, disk=1000, shared=True).capped({key: 40})
    assert (caps.device, caps.host, caps.disk) == (40, 40, 1000)


def test_caps_on_a_gpu_machine_are_per_tier():
    caps = Capacities(device=100, host=100, disk=1000, shared=False).capped({"device": 40})
    assert (caps.device, caps.host) == (40, 100)


def test_auto_policy_loads_and_generates(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    ids = torch.randint(3, 90, (3, 5))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy="auto", max_memory={"device": "700KB"}
    ) as model:
        assert model.offload_policy.weights.disk > 0
        got = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, stock.generate(ids, max_new_tokens=3, do_sample=False))


def test_auto_reoptimizes_for_the_real_batch(pre_ln_checkpoint):
    path, stock = pre_ln_checkpoint
    ids = torch.randint(3, 90, (5, 6))
    workload = Workload(prompt_len=8, gen_len=4, batch_size=2)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy="auto", max_memory={"host": "2MB"}, workload=workload
    ) as model:
        loaded = model.offload_policy
        assert model.policy_estimate.tokens_per_second > 0
        assert model.policy_estimate.block_size == loaded.block_size
        got = model.generate(ids, max_new_tokens=3, do_sample=False)
        run = model.generation_stats.policy
        assert model.offload_policy == loaded
    assert torch.equal(got, stock.generate(ids, max_new_tokens=3, do_sample=False))
    assert run.weights == loaded.weights  # placed at load, kept
    assert run.block_size >= 5 and run.block_size - run.micro_batch_size < 5


def test_fixed_policy_runs_as_given(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    policy = Policy(micro_batch_size=2, num_micro_batches=2)
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.generate(torch.randint(3, 90, (3, 4)), max_new_tokens=2, do_sample=False)
        assert model.generation_stats.policy == policy
        assert model.policy_estimate.block_size == 4


def test_workload_must_be_a_workload(pre_ln_checkpoint):
    with pytest.raises(TypeError, match="Workload"):
        FlexOffloadOPTForCausalLM.from_pretrained(pre_ln_checkpoint[0], workload={"gen_len": 4})


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_container_memory_limit_caps_available_ram(tmp_path, version):
    from hf_flexoffload.planning.budget import cgroup_room

    limit, usage, cache = 3 * 2**30, 2 * 2**30, 2**28
    if version == "v1":
        proc = "4:memory:/job/step\n1:cpu:/\n"
        own = tmp_path / "memory" / "job" / "step"
        files = {"memory.limit_in_bytes": limit, "memory.usage_in_bytes": usage}
        stat = f"cache 1\ntotal_inactive_file {cache}\n"
    else:
        proc = "0::/job/step\n"
        own = tmp_path / "job" / "step"
        files = {"memory.max": limit, "memory.current": usage}
        stat = f"anon 1\ninactive_file {cache}\n"
    own.mkdir(parents=True)
    for name, value in files.items():
        (own / name).write_text(f"{value}\n")
    (own / "memory.stat").write_text(stat)
    (tmp_path / "cgroup").write_text(proc)
    # Room = limit - usage, with the droppable page cache given back.
    assert cgroup_room(str(tmp_path / "cgroup"), str(tmp_path)) == limit - usage + cache
    # A parent with a tighter limit wins; "max" (v2) and the v1 "no limit" value do not count.
    parent, (limit_file, usage_file) = own.parent, files
    unlimited = "max" if version == "v2" else str(2**63 - 4096)
    (parent / limit_file).write_text(unlimited)
    (parent / usage_file).write_text("0")
    assert cgroup_room(str(tmp_path / "cgroup"), str(tmp_path)) == limit - usage + cache
    (parent / limit_file).write_text(str(2**30))
    assert cgroup_room(str(tmp_path / "cgroup"), str(tmp_path)) == 2**30


def test_no_cgroup_limit_means_no_room_cap(tmp_path):
    from hf_flexoffload.planning.budget import cgroup_room

    (tmp_path / "cgroup").write_text("0::/\n")
    assert cgroup_room(str(tmp_path / "cgroup"), str(tmp_path)) is None
    assert cgroup_room(str(tmp_path / "missing"), str(tmp_path)) is None


# -- device capacity from the CUDA allocator's state ---------------------------------------------


def test_blocks_the_allocator_keeps_after_a_run_are_capacity():
    # After a generate the cache and workspace are freed into the caching allocator: the driver
    # reports them used, but the next run's tensors reuse them.
    state = AllocatorState(free=10 * GiB, total=80 * GiB, reserved=30 * GiB, allocated=5 * GiB)
    assert device_capacity(state) == 10 * GiB + 25 * GiB


def test_memory_live_tensors_hold_is_not_capacity():
    state = AllocatorState(free=10 * GiB, total=80 * GiB, reserved=30 * GiB, allocated=30 * GiB)
    assert device_capacity(state) == 10 * GiB


@pytest.mark.parametrize(
    "allocated, expected",
    [(0, 20 * GiB), (8 * GiB, 12 * GiB), (25 * GiB, 0)],
    ids=["nothing-live", "some-live", "over-the-cap"],
)
def test_per_process_fraction_caps_what_the_process_may_reserve(allocated, expected):
    state = AllocatorState(
        free=60 * GiB,
        total=80 * GiB,
        reserved=max(allocated, 4 * GiB),
        allocated=allocated,
        fraction=0.25,
    )
    assert device_capacity(state) == expected


def _fake_cuda(monkeypatch, *, free, total, reserved, allocated, fraction=None):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    if fraction is None:  # a torch without the getter
        monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction", raising=False)
    else:

        def get_fraction(device):
            # As torch's getter: a device without an index is refused.
            if isinstance(device, torch.device) and device.index is None:
                raise ValueError(f"Expected a torch.device with a specified index: {device}")
            return fraction

        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", get_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("index", [0, None], ids=["cuda:0", "cuda"])
@pytest.mark.parametrize("fraction, expected", [(None, 14 * GiB), (0.1, 6 * GiB)])
def test_measure_reads_the_allocator_state_on_cuda(
    monkeypatch, tmp_path, fraction, expected, index
):
    # Runs on CPU: torch.cuda's memory queries are faked.
    _fake_cuda(
        monkeypatch,
        free=10 * GiB,
        total=80 * GiB,
        reserved=6 * GiB,
        allocated=2 * GiB,
        fraction=fraction,
    )
    caps = Capacities.measure(torch.device("cuda", index), str(tmp_path), {"host": "1GiB"})
    assert (caps.device, caps.host, caps.shared) == (expected, GiB, False)


@pytest.mark.parametrize("shared", [True, False], ids=["one-ram", "separate-device"])
def test_buffers_kept_from_a_run_are_counted_once(pre_ln_checkpoint, monkeypatch, shared):
    # The weight staging pools outlive a generate. Free memory is measured with them allocated
    # and the memory model counts them again, so what the model holds is added back: all of it,
    # in the profile the auto policy is re-planned with as in the pre-generate check. Unshared
    # (as on CUDA), each tier gets back what the model holds on it.
    path, _ = pre_ln_checkpoint
    policy = Policy(weights=Split(device=0.5, disk=0.5))
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.generate(torch.randint(3, 90, (2, 4)), max_new_tokens=2, do_sample=False)
        engine = model.engine
        live, weights = engine.counters.live, engine.store.bytes_per_tier()
        assert live["device"] > weights["device"], "the staging pools are kept"
        # As ``measure`` returns them: capped, so one RAM has one size.
        fixed = Capacities(device=GiB, host=2 * GiB, disk=100 * GiB, shared=shared).capped(None)
        monkeypatch.setattr(Capacities, "measure", classmethod(lambda cls, *a, **k: fixed))
        if shared:
            device = host = GiB + live["device"] + live["host"]
        else:
            device, host = GiB + live["device"], 2 * GiB + live["host"]
        caps, profile = engine.capacities(), engine.profile()
        assert (caps.device, caps.host) == (device, host)
        assert (profile.device_memory, profile.host_memory) == (device, host)


@cuda_only
def test_freed_cuda_tensors_stay_capacity(tmp_path):
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()  # so the tensor below is a new block the driver reports used
    before = Capacities.measure(device, str(tmp_path)).device
    x = torch.empty(GiB, dtype=torch.uint8, device=device)
    during = Capacities.measure(device, str(tmp_path)).device
    del x  # back to the caching allocator, not to the driver
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= GiB
    after = Capacities.measure(device, str(tmp_path)).device
    assert during < before - GiB // 2
    assert after > before - GiB // 4  # other processes may take a little meanwhile


@cuda_only
def test_per_process_fraction_caps_cuda_capacity(tmp_path):
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info(device)[1]
    free = torch.cuda.mem_get_info(device)[0]
    fraction = 0.25
    if free < 0.5 * total:
        pytest.skip("the GPU is too busy for the fraction to be what binds")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        cap = Capacities.measure(device, str(tmp_path)).device
        assert cap == pytest.approx(fraction * total - torch.cuda.memory_allocated(device), abs=1)
        # The capacity is what can be allocated: a bit less fits, a bit more is refused.
        x = torch.empty(cap - 256 * 2**20, dtype=torch.uint8, device=device)
        del x
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(cap + 256 * 2**20, dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


# -- fuzz: a max_memory is either refused clearly or parsed to a sane number of bytes ---------

SIZES = (
    st.integers(-(10**15), 10**15)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.from_regex(r"\s?-?[0-9.e+]{0,6}\s?[kKmMgGtTiIbB]{0,3}\s?", fullmatch=True)
    | st.text(max_size=10)
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["device", "host", "disk", "gpu"]), SIZES) | SIZES)
def test_max_memory_fuzz(max_memory):
    from hf_flexoffload.planning.budget import check_max_memory

    try:
        check_max_memory(max_memory)
    except ValueError as err:
        assert "max_memory" in str(err)
        return
    for tier, size in (max_memory or {}).items():
        parsed = parse_size(size)
        assert isinstance(parsed, int) and parsed >= (1 if tier == "host" else 0)
        if isinstance(size, (int, float)):
            assert math.isfinite(size) and parsed == int(size)
