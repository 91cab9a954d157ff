from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import OPTConfig

from hf_flexoffload import Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.assets.toy import OPT_125M
from hf_flexoffload.planning.cost_model import (
    ModelSizes,
    estimate,
    fractions_of,
    realized_fractions,
)
from hf_flexoffload.storage.weight_layout import layout_for, placement_report

from .test_hardware import make_profile

SHAPE = OPTShape.from_config(OPTConfig(**OPT_125M))
F32 = torch.float32
WORKLOAD = Workload(prompt_len=64, gen_len=16)
OFFLOADED = Policy(micro_batch_size=16, weights=Split(device=0.3, disk=0.7))
SERIAL = replace(OFFLOADED, overlap=False)


def test_weight_bytes_per_tier_are_the_placements():
    est = estimate(SHAPE, F32, make_profile(), WORKLOAD, OFFLOADED)
    placed = placement_report(layout_for(SHAPE, OFFLOADED, F32), OFFLOADED.weights)
    assert est.peak_bytes["disk"] == placed.bytes_per_tier["disk"]
    assert est.peak_bytes["device"] > placed.bytes_per_tier["device"]  # + cache, staging


def test_kv_cache_bytes_follow_compression():
    plain = ModelSizes.of(SHAPE, F32, Policy())
    packed = ModelSizes.of(SHAPE, F32, Policy(compress_cache=QuantConfig(bits=4, group_size=64)))
    assert plain.kv_token == 2 * SHAPE.hidden * 4
    assert packed.kv_token == 2 * SHAPE.hidden * (4 + 2 * 32 / 64) / 8  # codes + scale, min


def test_no_overlap_is_the_sum_of_the_terms():
    overlapped = estimate(SHAPE, F32, make_profile(overlap_penalty=0.0), WORKLOAD, OFFLOADED)
    serial = estimate(SHAPE, F32, make_profile(), WORKLOAD, SERIAL)
    assert serial.total_seconds > overlapped.total_seconds
    terms = serial.layer_seconds
    assert overlapped.layer_seconds == pytest.approx(terms)


@pytest.mark.parametrize("penalty", [0.0, 0.5, 1.0])
def test_overlap_penalty_interpolates_between_max_and_sum(penalty):
    profile = make_profile(overlap_penalty=penalty)
    est = estimate(SHAPE, F32, profile, WORKLOAD, OFFLOADED)
    serial = estimate(SHAPE, F32, profile, WORKLOAD, SERIAL)
    none = estimate(SHAPE, F32, make_profile(overlap_penalty=0.0), WORKLOAD, OFFLOADED)
    if penalty == 1.0:  # only the head's fetch still overlaps
        assert none.total_seconds < est.total_seconds <= serial.total_seconds
    elif penalty == 0.0:
        assert est.total_seconds == pytest.approx(none.total_seconds)
    else:
        assert none.total_seconds < est.total_seconds < serial.total_seconds


def test_more_on_disk_is_slower_when_reads_dominate():
    slow = make_profile(cached_disk_read=1e8, disk_read=1e8)
    policies = [
        Policy(micro_batch_size=4, weights=Split(device=1 - d, disk=d)) for d in (0, 0.3, 0.9)
    ]
    times = [estimate(SHAPE, F32, slow, WORKLOAD, p).total_seconds for p in policies]
    assert times == sorted(times) and times[0] < times[-1]


def test_cold_disk_when_the_page_cache_cannot_hold_the_offloaded_bytes():
    warm = estimate(SHAPE, F32, make_profile(), WORKLOAD, OFFLOADED)
    cold = estimate(SHAPE, F32, make_profile(ram_available=2**30), WORKLOAD, OFFLOADED)
    assert warm.page_cached and not cold.page_cached
    assert cold.total_seconds > warm.total_seconds


@pytest.mark.parametrize(
    ("direct_penalty", "faster"), [(0.0, True), (2.0, False)], ids=["overlaps", "contends"]
)
def test_direct_io_reads_cold_with_its_own_overlap_penalty(direct_penalty, faster):
    profile = make_profile(overlap_penalty=1.0, direct_overlap_penalty=direct_penalty)
    slow_cold = replace(profile, disk_read=2e8)
    cached = estimate(SHAPE, F32, slow_cold, WORKLOAD, OFFLOADED)
    direct = estimate(SHAPE, F32, slow_cold, WORKLOAD, replace(OFFLOADED, direct_io=True))
    assert cached.page_cached and not direct.page_cached, "direct reads skip the page cache"
    assert direct.total_seconds > cached.total_seconds  # cold reads at 0.2 GB/s vs 8 GB/s
    # Where the page cache cannot hold the files anyway, only the overlap differs.
    cold = replace(profile, ram_available=2**20)
    cold_cached = estimate(SHAPE, F32, cold, WORKLOAD, OFFLOADED)
    cold_direct = estimate(SHAPE, F32, cold, WORKLOAD, replace(OFFLOADED, direct_io=True))
    assert (cold_direct.total_seconds < cold_cached.total_seconds) == faster


def test_direct_io_without_a_measured_direct_penalty_is_priced_as_cached():
    profile = make_profile()  # a filesystem without O_DIRECT: the runtime falls back
    a = estimate(SHAPE, F32, profile, WORKLOAD, OFFLOADED)
    b = estimate(SHAPE, F32, profile, WORKLOAD, replace(OFFLOADED, direct_io=True))
    assert a.total_seconds == pytest.approx(b.total_seconds)


def test_realized_fractions_round_to_whole_units():
    policy = Policy(micro_batch_size=2, num_micro_batches=3, cache=Split(device=0.5, disk=0.5))
    values = realized_fractions(SHAPE, F32, policy)
    units = SHAPE.layers * 3
    assert values["cache.device"] * units == round(values["cache.device"] * units)
    assert sum(values[f"cache.{t}"] for t in ("device", "host", "disk")) == pytest.approx(1)
    assert fractions_of(policy)["cache.device"] == 0.5


def test_throughput_is_generated_tokens_over_time():
    est = estimate(SHAPE, F32, make_profile(), WORKLOAD, OFFLOADED)
    assert est.tokens_per_second == pytest.approx(16 * 16 / est.total_seconds)
    assert est.bottleneck in ("compute", "weights", "read", "write")


@pytest.mark.parametrize(
    ("pinned", "kernel"), [(None, True), (0, False)], ids=["measured_crossover", "pinned_off"]
)
def test_tiled_4bit_decode_is_priced_at_the_kernel_rate_without_dequantizing(pinned, kernel):
    # OPT-125M's matrices take the kernel's layout with input-channel groups of 32.
    q4 = QuantConfig(bits=4, group_size=32, dim=1)
    assert ModelSizes.of(SHAPE, F32, Policy(compress_weights=q4)).tiled_weights
    policy = Policy(micro_batch_size=4, compress_weights=q4, int4_kernel_rows=pinned)
    slow_kernel = make_profile(int4_matmul_flops={1: 1e9, 64: 1e9}, int4_kernel_rows=16)
    fast_kernel = replace(slow_kernel, int4_matmul_flops={1: 1e12, 64: 1e12})
    slow = estimate(SHAPE, F32, slow_kernel, WORKLOAD, policy).layer_seconds
    fast = estimate(SHAPE, F32, fast_kernel, WORKLOAD, policy).layer_seconds
    plain = estimate(SHAPE, F32, make_profile(), WORKLOAD, policy).layer_seconds
    if kernel:  # decode computes 4 rows <= 16: the kernel's rate, no dequantizing pass
        assert fast["compute"] < slow["compute"]
        assert fast["weights"] < plain["weights"]
    else:  # the dense matmul after dequantizing, whatever the kernel's rate
        assert fast == pytest.approx(slow)
        assert fast == pytest.approx(plain)
