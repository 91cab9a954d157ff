from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig

from hf_flexoffload import InfeasiblePolicyError, Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.assets.toy import OPT_125M
from hf_flexoffload.planning.cost_model import estimate
from hf_flexoffload.planning.optimizer import optimize

from .test_hardware import make_profile

SHAPE = OPTShape.from_config(OPTConfig(**OPT_125M))
F32 = torch.float32
WORKLOAD = Workload(prompt_len=64, gen_len=16, max_batch_size=64)
GiB = 2**30


def gpu_profile(device: float, host: float, disk: float = 100):
    return make_profile(
        device="cuda:0",
        shared=False,
        device_memory=int(device * GiB),
        host_memory=int(host * GiB),
        disk_space=int(disk * GiB),
        ram_available=int(host * GiB),
        host_to_device=12e9,
        device_to_host=12e9,
        matmul_flops={1: 1e12, 64: 30e12, 1024: 100e12},
        device_attention_bytes=1e12,
        dequantize_bytes=200e9,
        overlap_penalty=0.0,
    )


def fits(policy: Policy, profile) -> bool:
    peak = estimate(SHAPE, F32, profile, WORKLOAD, policy).peak_bytes
    if profile.shared:
        return peak["device"] + peak["host"] <= profile.device_memory
    return all(peak[t] <= profile.capacity(t) for t in ("device", "host", "disk"))


@pytest.mark.parametrize("ram_gib", [0.4, 0.6, 1.0, 2.0], ids=lambda g: f"ram-{g}GiB")
def test_cpu_solutions_fit_shared_ram(ram_gib):
    profile = make_profile().with_caps({"host": int(ram_gib * GiB)})
    policy, est = optimize(SHAPE, F32, profile, WORKLOAD)
    assert est.peak_bytes["device"] + est.peak_bytes["host"] <= int(ram_gib * GiB)
    assert fits(policy, profile)
    assert policy.weights.host == policy.cache.host == 0  # one RAM: the device tier holds it
    assert est == estimate(SHAPE, F32, profile, WORKLOAD, policy)


@pytest.mark.parametrize(
    "device, host", [(0.35, 0.5), (0.5, 1.0), (1.0, 4.0)], ids=["tiny", "small", "roomy"]
)
def test_gpu_solutions_fit_every_tier(device, host):
    profile = gpu_profile(device, host)
    policy, est = optimize(SHAPE, F32, profile, WORKLOAD)
    assert est.peak_bytes["device"] <= profile.device_memory
    assert est.peak_bytes["host"] <= profile.host_memory
    assert fits(policy, profile)


def test_everything_on_the_device_when_it_fits():
    policy, _ = optimize(SHAPE, F32, gpu_profile(16, 64), WORKLOAD)
    assert policy.weights == Split(device=1.0) and policy.cache == Split(device=1.0)


@pytest.mark.parametrize("shared", [True, False], ids=["cpu", "gpu"])
def test_more_memory_is_never_slower(shared):
    sizes = [0.45, 0.5, 0.6, 0.8, 1.2, 2.0, 4.0]
    speeds = []
    for gib in sizes:
        if shared:
            profile = make_profile().with_caps({"host": int(gib * GiB)})
        else:
            profile = gpu_profile(gib / 1.5, gib)
        speeds.append(optimize(SHAPE, F32, profile, WORKLOAD)[1].tokens_per_second)
    assert speeds == sorted(speeds)
    assert speeds[-1] > speeds[0]


def test_infeasible_budget_says_the_smallest_memory_that_works():
    profile = make_profile().with_caps({"host": 10 * 2**20})
    with pytest.raises(InfeasiblePolicyError, match=r"at least .* of RAM") as info:
        optimize(SHAPE, F32, profile, WORKLOAD)
    needed = info.value.needed["ram"]
    assert needed > 10 * 2**20
    # What the message asks for is enough.
    roomy = make_profile().with_caps({"host": int(needed * 1.02)})
    _, est = optimize(SHAPE, F32, roomy, WORKLOAD)
    assert est.peak_bytes["device"] <= roomy.device_memory


def test_compression_only_when_allowed():
    profile = make_profile().with_caps({"host": int(0.25 * GiB)})
    plain, _ = optimize(SHAPE, F32, profile, WORKLOAD)
    assert plain.compress_weights is None and plain.compress_cache is None
    # Make reading weights expensive: compressing them now pays.
    slow_disk = make_profile(cached_disk_read=2e8, disk_read=2e8, dequantize_bytes=50e9)
    slow_disk = slow_disk.with_caps({"host": int(0.25 * GiB)})
    allowed = Workload(prompt_len=64, gen_len=16, max_batch_size=64, allow_compression=True)
    packed, _ = optimize(SHAPE, F32, slow_disk, allowed)
    assert packed.compress_weights == QuantConfig()  # input-channel groups of 32, searched
    if packed.compress_cache is not None:  # the cache: whole heads of 64, min-max per token
        assert packed.compress_cache == QuantConfig(bits=4, group_size=64, rounding="minmax")


def test_fixed_weights_are_kept_and_the_batch_is_covered():
    profile = make_profile().with_caps({"host": int(0.4 * GiB)})
    loaded, _ = optimize(SHAPE, F32, profile, WORKLOAD)
    run = Workload(prompt_len=20, gen_len=5, batch_size=37)
    policy, est = optimize(SHAPE, F32, profile, run, fixed=loaded)
    assert policy.weights == loaded.weights and policy.overlap == loaded.overlap
    assert policy.block_size >= 37 and policy.block_size - policy.micro_batch_size < 37
    assert est.peak_bytes["device"] <= profile.device_memory


def test_saved_compression_is_kept():
    q8 = QuantConfig(bits=8, group_size=32)
    policy, _ = optimize(SHAPE, F32, make_profile(), WORKLOAD, compression=(q8, False))
    assert policy.compress_weights == q8 and policy.compress_embeddings is False
