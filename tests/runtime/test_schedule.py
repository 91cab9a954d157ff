"""The zig-zag property: an offloaded layer loads once per forward, whatever the micro-batching."""

from __future__ import annotations

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

from ..conftest import batch


@pytest.mark.parametrize("micro_batch_size", [6, 2, 1], ids=["1_mb", "3_mbs", "6_mbs"])
def test_weights_load_once_per_forward(pre_ln_checkpoint, micro_batch_size):
    path, _ = pre_ln_checkpoint
    policy = Policy(micro_batch_size=micro_batch_size, weights=Split(host=0.4, disk=0.6))
    ids, mask = batch(rows=6)
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        engine = model.engine
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        stats = model.generation_stats
        loads = dict(engine.counters.stage_loads)
        layouts = engine.layouts
        disk = model.placement_report.bytes_per_tier["disk"]
        per_stage = model.placement_report.per_stage
    assert loads == dict.fromkeys(range(len(layouts)), 3)
    # Every decoder layer's disk bytes once per forward, and the streamed LM head's (the tied
    # embedding matrix) once per forward too, since the head runs on the whole block at once;
    # the outer stages' small tensors once in all (kept). Lookups read only the rows of their
    # tokens: at most one token and one position row per token per forward.
    outer = per_stage[0]["disk"] + per_stage[-1]["disk"]
    head = _disk_bytes(layouts[0], "decoder.embed_tokens.weight")
    positions = _disk_bytes(layouts[0], "decoder.embed_positions.weight")
    expected = (disk - outer) * 3 + head * 3 + (outer - head - positions)
    tokens = ids.numel() + 2 * ids.shape[0]
    row = 2 * max(s.row_bytes for s in layouts[0].specs)
    assert expected <= stats.bytes_moved["disk_to_host"] <= expected + tokens * row


def _disk_bytes(layout, name):
    spec = next(s for s in layout.specs if s.name == name)
    return sum(
        (g.stop - g.start) * spec.row_bytes for g in layout.segments_of(name) if g.tier == "disk"
    )


@pytest.mark.parametrize(
    "policy, threaded",
    [
        (Policy(overlap=True), set()),
        (Policy(overlap=True, activations=Split(disk=1.0)), {"read", "write"}),
        (Policy(overlap=True, weights=Split(disk=1.0)), {"weights"}),
        (Policy(overlap=True, cache=Split(disk=1.0)), {"read", "write"}),
    ],
    ids=["all_resident", "activations_disk", "weights_disk", "cache_disk"],
)
def test_tasks_that_move_nothing_run_inline(pre_ln_checkpoint, policy, threaded):
    """A thread hand-off per (layer, micro-batch) costs more than a task that moves nothing;
    tasks that move bytes still go to their background queue."""
    path, stock = pre_ln_checkpoint
    ids, mask = batch(rows=4)
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        # Pools start their thread on the first submitted task.
        used = {kind for kind, pool in model.engine.mover._pools.items() if pool._threads}
    assert torch.equal(got, expected)
    assert used == threaded
