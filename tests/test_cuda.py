"""On a CUDA device: golden equality, repeated generates, pinned bytes, copies on side streams.

Skipped without a GPU; `benchmarks/gpu_check.py` runs them on the first machine that has one.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

from .conftest import batch
from .modeling.test_causal_lm import PLACEMENTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda", 0)
GENERATE = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)


def load(path: str, policy: Policy, **kw) -> FlexOffloadOPTForCausalLM:
    return FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy, device=CUDA, **kw)


def on_cuda(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch(seed=seed)
    return ids.to(CUDA), mask.to(CUDA)


@pytest.mark.parametrize("policy", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_greedy_tokens_and_logits_match_stock_on_cuda(checkpoint, policy):
    path, stock = checkpoint
    stock = copy.deepcopy(stock).to(CUDA)
    ids, mask = on_cuda()
    expected = stock.generate(ids, attention_mask=mask, **GENERATE)
    with load(path, policy) as model:
        got = model.generate(ids, attention_mask=mask, **GENERATE)
    assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
    # Micro-batches change GEMM shapes (cuBLAS may pick other kernels) and host attention runs
    # on the CPU: logits agree to fp32 rounding, not bit for bit.
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), atol=1e-3, rtol=1e-4)


def test_fp16_host_attention_matches_stock_on_cuda(pre_ln_checkpoint, tmp_path):
    """fp16 on the GPU, the cache on the host attended there in fp32: tokens as stock's; logits
    within fp16 rounding (2e-2)."""
    _, stock = pre_ln_checkpoint
    stock = copy.deepcopy(stock).to(CUDA, torch.float16)
    stock.save_pretrained(tmp_path)
    ids, mask = on_cuda(seed=1)
    expected = stock.generate(ids, attention_mask=mask, **GENERATE)
    policy = Policy(cache=Split(host=0.5, disk=0.5), host_attention=True, micro_batch_size=2)
    with load(str(tmp_path), policy, dtype=torch.float16) as model:
        got = model.generate(ids, attention_mask=mask, **GENERATE)
    assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours.float().cpu(), theirs.float().cpu(), atol=2e-2, rtol=0)


def test_two_generates_under_a_device_cap(pre_ln_checkpoint):
    """The second generate must not be refused because the first one's freed blocks are still
    reserved by the caching allocator."""
    path, _ = pre_ln_checkpoint
    ids, mask = on_cuda()
    policy = Policy(weights=Split(device=0.5, host=0.5), cache=Split(device=1.0))
    with load(path, policy, max_memory={"device": "256MiB"}) as model:
        first = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        second = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)


def test_host_weights_are_pinned_at_their_size(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    with load(path, Policy(weights=Split(host=1.0))) as model:
        store = model.engine.store
        host = [e for e in store._entries.values() if e.tier == "host"]
        nbytes = sum(e.nbytes for e in host)
        assert all(e.tensor.is_pinned() for e in host)
        # Whole pages per tensor, never a power-of-two block.
        assert nbytes <= store.pinned.pinned_bytes <= nbytes + 4096 * len(host)
    with load(path, Policy(weights=Split(host=1.0), pin_weights=False)) as model:
        store = model.engine.store
        assert store.pinned.pinned_bytes == 0
        assert not any(e.tensor.is_pinned() for e in store._entries.values() if e.tier == "host")


def test_weight_copies_run_on_a_side_stream(pre_ln_checkpoint, tmp_path):
    """With overlap, host->device weight copies are issued on the weight stream, not on the
    stream the GEMMs run on (whether they overlap in time is measured by gpu_check)."""
    path, _ = pre_ln_checkpoint
    ids, mask = on_cuda()
    with load(path, Policy(weights=Split(host=1.0), overlap=True)) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm up
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = Counter(e["args"].get("stream") for e in events if e.get("cat") == "kernel")
    copies = {
        e["args"].get("stream")
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    }
    compute_stream = kernels.most_common(1)[0][0]
    assert copies - {compute_stream}, (copies, kernels)


def test_hot_path_helpers_do_not_sync():
    """Quantizing, dequantizing, rotary angles and a streamed lookup never wait for the GPU."""
    from hf_flexoffload.architectures import Rope
    from hf_flexoffload.formats.compression import QuantConfig, dequantize, quantize

    x = torch.randn(64, 256, device=CUDA, dtype=torch.float16)
    rope = Rope(dim=64, theta=1e4)
    positions = torch.arange(16, device=CUDA)[None]
    rope.cos_sin(positions, torch.float16)  # the first call builds the frequencies
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = quantize(x, QuantConfig())
        dequantize(q)
        rope.cos_sin(positions, torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_forwards_do_not_synchronize_the_device(pre_ln_checkpoint, monkeypatch):
    """Forwards are timed with events: no full device synchronize per forward (the host keeps
    enqueuing the next step), and the stats still have the times."""
    path, _ = pre_ln_checkpoint
    ids, mask = on_cuda()
    policy = Policy(weights=Split(host=0.5, disk=0.5), micro_batch_size=2, overlap=True)
    with load(path, policy) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm-up
        calls = []
        real = torch.cuda.synchronize
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a) or real(*a))
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        stats = model.generation_stats
    assert calls == []
    assert stats.forwards == 8 and stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_host_tier_kv_cache_is_pinned(tmp_path):
    """History uploads from the host tier are asynchronous: its buffer is page-locked."""
    from hf_flexoffload.config.counters import Counters
    from hf_flexoffload.storage.kv_cache import KVUnit

    unit = KVUnit(
        tier="host", batch=2, heads=4, head_dim=16, dtype=torch.float16, device=CUDA,
        host_attention=False, path=str(tmp_path / "kv"), counters=Counters(), capacity=8,
    )  # fmt: skip
    unit._append_memory(0, torch.randn(3, *unit.codec.record_shape, device=CUDA).half())
    assert unit._buffer.device.type == "cpu" and unit._buffer.is_pinned()


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-stored"])
def test_streamed_head_copies_host_chunks_on_a_side_stream(tmp_path, storage):
    """Host-tier chunks of the LM head go to the device on ChunkCopies' side stream, two
    buffers in turn (each refilled only after its use): the projection is still exact."""
    from .storage.test_streamed import streamed

    torch.manual_seed(0)
    whole = torch.randn(301, 64)
    matrix, _ = streamed(tmp_path, whole, storage, rows_per_chunk=16, device=CUDA)
    x = torch.randn(5, 64, device=CUDA)
    expected = x @ whole.to(storage).float().to(CUDA).t()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = matrix.linear(x)
        torch.cuda.synchronize()
    torch.testing.assert_close(got, expected)
    assert matrix.buffers.copies._stream is not None
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies  # the host tier's chunks crossed (on the side stream: gpu_check's overlap)
