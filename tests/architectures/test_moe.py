"""Mixture of experts beyond the golden family tests: experts placed whole, only the routed
experts fetched (and what that saves, byte for byte), each expert run once per block across
micro-batches, the planning models' routing terms, and the refusals."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from hf_flexoffload import (
    AutoFlexOffloadModelForCausalLM,
    ExpertUsage,
    Policy,
    Split,
    Workload,
)
from hf_flexoffload.architectures import MoeDecoder, architecture_for
from hf_flexoffload.planning.cost_model import estimate
from hf_flexoffload.planning.memory_model import memory_items
from hf_flexoffload.planning.model_sizes import ModelSizes
from hf_flexoffload.storage.weight_layout import layout_for, placement_report

from ..conftest import batch, family_config
from ..planning.test_hardware import make_profile

MIXTRAL = "mixtral-top2"  # 6 experts, top 2, 3 layers


def mixtral() -> MoeDecoder:
    return architecture_for(family_config(MIXTRAL))


def load(path: str, policy: Policy):
    return AutoFlexOffloadModelForCausalLM.from_pretrained(path, offload_policy=policy)


@pytest.mark.parametrize(
    "split",
    [
        Split(device=0.3, host=0.3, disk=0.4),
        Split(host=0.55, disk=0.45),
        Split(host=0.07, disk=0.93),
    ],
    ids=["three_tiers", "host_disk", "almost_all_disk"],
)
def test_experts_are_placed_whole_first_ones_fastest(split):
    arch = mixtral()
    layouts = layout_for(arch, Policy(weights=split), torch.float32)
    order = {"device": 0, "host": 1, "disk": 2}
    for layout in layouts[1:-1]:
        tiers = defaultdict(set)
        for seg in layout.segments:
            expert = arch.expert_of(layout.local[seg.name])
            if expert is not None:
                tiers[expert].add(order[seg.tier])
        assert sorted(tiers) == list(range(arch.num_experts))
        assert all(len(t) == 1 for t in tiers.values()), "an expert split between tiers"
        ranks = [next(iter(tiers[e])) for e in range(arch.num_experts)]
        assert ranks == sorted(ranks), "a later expert on a faster tier"
    # Whole experts: the realized split is within half an expert of the requested one.
    layer = sum(s.nbytes for s in layouts[1].specs)
    expert = sum(s.nbytes for s in layouts[1].specs if s.unit == 0)
    realized = placement_report(layouts, split).per_stage[1]
    for tier in ("device", "host", "disk"):
        assert abs(realized[tier] / layer - getattr(split, tier)) <= expert / layer / 2 + 1e-9


def test_routers_stay_unquantized_and_flops_count_top_k():
    from hf_flexoffload import QuantConfig

    arch = mixtral()
    policy = Policy(compress_weights=QuantConfig(bits=4, group_size=32))
    layout = layout_for(arch, policy, torch.float32)[1]
    quantized = {layout.local[n] for n in layout.formats}
    assert "block_sparse_moe.gate.weight" not in quantized
    assert "block_sparse_moe.experts.5.w2.weight" in quantized
    sizes = ModelSizes.of(arch, torch.float32, Policy())
    h, f, k = arch.hidden, arch.expert_ffn, arch.top_k
    assert sizes.routed_flops == 2 * k * 3 * h * f
    attention = 2 * h * (arch.heads + 2 * arch.kv_heads) * arch.head_dim
    attention += 2 * arch.heads * arch.head_dim * h
    assert sizes.layer_flops == attention + 2 * arch.num_experts * h + sizes.routed_flops


@pytest.mark.compat
@pytest.mark.parametrize("model_checkpoint", [MIXTRAL], indirect=True)
def test_only_routed_experts_are_read(model_checkpoint):
    """Experts on disk, one sequence: a decode step routes to 2 of 6 experts per layer.
    Routed-only fetching reads exactly the non-expert bytes plus the routed experts' bytes,
    the ablation every expert; both generate stock's tokens."""
    path, stock = model_checkpoint
    ids = torch.tensor([[5, 17, 42]])
    greedy = dict(max_new_tokens=6, do_sample=False)
    expected = stock.generate(ids, **greedy)
    policy = Policy(weights=Split(host=0.3, disk=0.7))
    runs = {}
    for routed in (True, False):
        fetch = "routed" if routed else "all"
        with load(path, replace(policy, expert_fetch=fetch)) as model:
            assert torch.equal(model.generate(ids, **greedy), expected)
            layouts = model.engine.layouts
            runs[routed] = model.generation_stats
    arch = mixtral()
    disk_experts = sum(  # bytes of every expert stored on disk, all layers
        s.nbytes
        for layout in layouts
        for s in layout.specs
        if s.unit is not None and layout.segments_of(s.name)[0].tier == "disk"
    )
    routed, dense = runs[True], runs[False]
    assert routed.forwards == dense.forwards == 6
    # The same experts were routed to; at least top-k and at most every expert per layer/step.
    assert routed.routed_experts == dense.routed_experts
    assert arch.layers * arch.top_k * 6 <= routed.routed_experts
    assert routed.routed_experts <= arch.layers * (arch.num_experts + arch.top_k * 5)
    assert 0 < routed.routed_expert_bytes < disk_experts * 6
    read, read_all = routed.bytes_moved["disk_to_host"], dense.bytes_moved["disk_to_host"]
    assert read_all - read == disk_experts * 6 - routed.routed_expert_bytes
    assert read < 0.75 * read_all


@pytest.mark.compat
@pytest.mark.parametrize("model_checkpoint", ["qwen2_moe-shared_expert"], indirect=True)
def test_each_expert_runs_once_per_step_across_micro_batches(model_checkpoint, monkeypatch):
    path, _ = model_checkpoint
    calls = defaultdict(int)
    blocks = []
    expert, sparse_mlp = MoeDecoder._expert, MoeDecoder.sparse_mlp

    def count_expert(self, w, e, *args):
        calls[(len(blocks), e)] += 1
        return expert(self, w, e, *args)

    def count_block(self, w, h, load):
        blocks.append(h.shape[0])
        return sparse_mlp(self, w, h, load)

    monkeypatch.setattr(MoeDecoder, "_expert", count_expert)
    monkeypatch.setattr(MoeDecoder, "sparse_mlp", count_block)
    ids, mask = batch()  # 5 rows of 7 tokens
    policy = Policy(micro_batch_size=2, num_micro_batches=3, weights=Split(host=0.5, disk=0.5))
    with load(path, policy) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    sparse_layers = 2  # of 3: mlp_only_layers=[1]
    # One sparse MLP per sparse layer per step over the whole block, not one per micro-batch.
    assert blocks == [5 * 7] * sparse_layers + [5] * sparse_layers * 2
    assert max(calls.values()) == 1


def test_planning_counts_the_experts_hit():
    arch = mixtral()
    sizes = ModelSizes.of(arch, torch.float32, Policy())
    E, k = arch.num_experts, arch.top_k
    assert sizes.experts_hit(1) == pytest.approx(k)
    assert sizes.experts_hit(10) == pytest.approx(E * (1 - (1 - k / E) ** 10))
    assert sizes.experts_hit(10_000) == pytest.approx(E)
    assert sizes.read_share(1, "routed") == pytest.approx(k / E)
    assert sizes.read_share(1, "all") == 1.0
    # "auto": routed where the step is expected to hit under 3/4 of the experts.
    assert sizes.read_share(1, "auto") == pytest.approx(k / E)
    assert sizes.read_share(5, "auto") == 1.0  # 6 (1 - (2/3)^5) = 5.2 of 6 experts
    assert sizes.read_share(5, "routed") == pytest.approx(1 - (1 - k / E) ** 5)
    # A dense model reads everything it offloads.
    dense = ModelSizes.of(
        architecture_for(family_config("olmo2-post_norm")), torch.float32, Policy()
    )
    assert dense.experts == 0 and dense.read_share(1, "routed") == 1.0
    # Decode at block 1 from disk (a larger, read-bound shape): routed reads 2 of 8 experts.
    big = architecture_for(
        family_config(MIXTRAL, hidden_size=512, intermediate_size=2048, num_local_experts=8)
    )
    profile, policy = make_profile(), Policy(weights=Split(disk=1.0))
    work = Workload(prompt_len=8, gen_len=8)
    fast = estimate(big, torch.float32, profile, work, policy)
    slow = estimate(big, torch.float32, profile, work, replace(policy, expert_fetch="all"))
    # Routed reads wait for the router: they count on the compute thread.
    assert fast.layer_seconds["weights"] == 0 < slow.layer_seconds["weights"]
    assert fast.decode_seconds < 0.4 * slow.decode_seconds
    # The memory model holds the whole block's tokens for the experts.
    items = memory_items(sizes, True, Policy(micro_batch_size=4), work, offloaded=False)
    assert items["expert batches"]["device"].const > 2 * 4 * 8 * arch.hidden * 4


@pytest.mark.parametrize("model_checkpoint", [MIXTRAL], indirect=True)
def test_router_logits_are_refused(model_checkpoint):
    path, _ = model_checkpoint
    with load(path, Policy()) as model, pytest.raises(ValueError, match="output_router_logits"):
        model(input_ids=torch.tensor([[5, 6]]), output_router_logits=True)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        (MIXTRAL, dict(num_experts_per_tok=7), "num_experts_per_tok=7"),
        ("qwen3_moe-sparse_step", dict(num_experts_per_tok=0), "num_experts_per_tok=0"),
    ],
    ids=["top_k_above_experts", "top_k_zero"],
)
def test_bad_routing_is_refused(name, overrides, message):
    config = family_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        architecture_for(config)


# -- calibration: experts placed most used first ------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("model_checkpoint", [MIXTRAL], indirect=True)
def test_calibrated_experts_are_placed_most_used_first(model_checkpoint, tmp_path):
    """A calibration run counts the routing; loaded with it, each layer keeps its most used
    experts resident, so a decode step of the same prompt reads fewer routed bytes than with
    the experts in index order, and still generates stock's tokens."""
    path, stock = model_checkpoint
    ids = torch.tensor([[5, 17, 42, 8, 60]])
    greedy = dict(max_new_tokens=6, do_sample=False)
    expected = stock.generate(ids, **greedy)
    policy = Policy(weights=Split(host=0.5, disk=0.5), expert_fetch="routed")
    with load(path, policy) as model:
        assert torch.equal(model.generate(ids, **greedy), expected)
        usage, plain = model.expert_usage(), model.generation_stats
        model.reset_expert_usage()
        with pytest.raises(ValueError, match="no token was routed"):
            model.expert_usage()
    arch = mixtral()
    # Every forwarded token is routed to top_k experts in every layer: 5 + 5 tokens here.
    assert all(sum(layer) == (5 + 5) * arch.top_k for layer in usage.counts)
    usage.save(tmp_path / "usage.json")
    assert ExpertUsage.load(tmp_path / "usage.json") == usage
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        path, offload_policy=policy, expert_usage=tmp_path / "usage.json"
    ) as model:
        assert torch.equal(model.generate(ids, **greedy), expected)
        calibrated = model.generation_stats
        for layer, layout in enumerate(model.engine.layouts[1:-1]):
            host = {
                arch.expert_of(layout.local[seg.name])
                for seg in layout.segments
                if seg.tier == "host" and arch.expert_of(layout.local[seg.name]) is not None
            }
            assert host == set(usage.order(layer)[: len(host)]) and host
    assert calibrated.routed_expert_bytes < plain.routed_expert_bytes


def test_expert_usage_is_checked():
    usage = ExpertUsage(counts=((3, 0, 1), (), (2, 2, 0)))
    assert usage.order(0) == (0, 2, 1) and usage.order(2) == (0, 1, 2)
    assert sum(usage.shares(0, top_k=2)) == pytest.approx(2)
    assert ExpertUsage.from_dict(usage.to_dict()) == usage
    with pytest.raises(ValueError, match=r"ExpertUsage\.counts"):
        ExpertUsage(counts=((1, -1),))
    with pytest.raises(ValueError, match="no token was routed"):
        ExpertUsage(counts=((0, 0),))
    with pytest.raises(ValueError, match="has no experts"):
        architecture_for(family_config("olmo2-post_norm")).with_expert_usage(usage)
    with pytest.raises(ValueError, match="another model"):
        mixtral().with_expert_usage(usage)  # 3 experts per layer, Mixtral's variant has 6


def test_measured_routing_sets_the_expected_hits():
    arch = mixtral()
    skewed = ExpertUsage(counts=((90, 90, 10, 5, 3, 2),) * arch.layers)
    sizes = ModelSizes.of(arch.with_expert_usage(skewed), torch.float32, Policy())
    uniform = ModelSizes.of(arch, torch.float32, Policy())
    probs = skewed.shares(0, arch.top_k)
    assert sizes.experts_hit(4) == pytest.approx(sum(1 - (1 - p) ** 4 for p in probs))
    assert sizes.experts_hit(4) < uniform.experts_hit(4)
    # Placement follows the measured order (ties: lower index first).
    local = [n for n, _ in arch.with_expert_usage(skewed).stage_tensors()[1] if ".experts." in n]
    assert [arch.expert_of(n) for n in local[::3]] == [0, 1, 2, 3, 4, 5]


def test_fused_experts_checkpoint_is_refused_saying_how_to_fix(tmp_path):
    from transformers import AutoModelForCausalLM

    config = family_config(MIXTRAL)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, save_original_format=False)
    with pytest.raises(ValueError, match="stored fused"):
        load(str(tmp_path), Policy())
