from __future__ import annotations

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Workload
from hf_flexoffload.budget import Capacities, InsufficientMemoryError, parse_size


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
    from hf_flexoffload.budget import cgroup_room

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
    from hf_flexoffload.budget import cgroup_room

    (tmp_path / "cgroup").write_text("0::/\n")
    assert cgroup_room(str(tmp_path / "cgroup"), str(tmp_path)) is None
    assert cgroup_room(str(tmp_path / "missing"), str(tmp_path)) is None
