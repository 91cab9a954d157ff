from __future__ import annotations

import os

import pytest
import torch

from hf_flexoffload import FlexOffloadCache, Split
from hf_flexoffload.config.counters import Counters
from hf_flexoffload.modeling.cache_keyword import cache_from_output


def make_cache(tmp_path, split):
    return FlexOffloadCache(
        num_layers=4,
        split=split,
        host_attention=True,
        heads=2,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        directory=str(tmp_path),
        counters=Counters(),
    )


def test_units_follow_the_split_and_batch_is_fixed(tmp_path):
    cache = make_cache(tmp_path, Split(device=0.25, host=0.25, disk=0.5))
    cache.allocate((2, 2))
    assert cache.realized_split() == {"device": 0.25, "host": 0.25, "disk": 0.5}
    with pytest.raises(ValueError, match="a cache belongs to one batch"):
        cache.allocate((4,))
    cache.close()


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_append_and_attend_match_plain_attention(tmp_path, tier):
    from hf_flexoffload.architectures.layers import attention
    from hf_flexoffload.storage.transfer import Mover

    cache = make_cache(tmp_path, Split(**{tier: 1.0}))
    cache.allocate((3,))
    unit, mover = cache.units[0][0], Mover(torch.device("cpu"), overlap=True)
    ks, vs = [], []
    for _step, s in enumerate((5, 1, 1)):
        q, k, v = (torch.randn(3, s, 2, 4) for _ in range(3))
        ks.append(k)
        vs.append(v)
        out = unit.attend(unit.fetch(), q, k, v, key_mask=None, mover=mover)
        keys = torch.cat(ks, 1).transpose(1, 2)
        values = torch.cat(vs, 1).transpose(1, 2)
        torch.testing.assert_close(out, attention(q.transpose(1, 2), keys, values, None))
    cache.drain()
    assert cache.get_seq_length() == 7
    mover.close()
    cache.close()


@pytest.mark.parametrize(
    "call", ["reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices"]
)
def test_unsupported_operations_raise(tmp_path, call):
    cache = make_cache(tmp_path, Split(device=1.0))
    with pytest.raises(NotImplementedError, match="FlexOffloadCache does not support"):
        getattr(cache, call)(1)


def test_reports_every_layer_as_full_attention_and_not_croppable(tmp_path):
    """transformers asks these of a cache; with no ``layers`` of its own the base class would
    answer "all linear attention" and "croppable", both wrong here."""
    cache = make_cache(tmp_path, Split(host=1.0))
    assert cache.is_linear == [False] * 4
    assert cache.is_sliding == [False] * 4
    assert not cache.is_croppable
    assert not cache.is_compileable


# -- compressed cache --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "expected"), [(None, "minmax"), ("minmax", "minmax"), ("search", "search")]
)
def test_token_codec_rounds_min_max_unless_asked(rounding, expected):
    """The cache quantizes every new token at run time: min-max unless the config asks for the
    search, and its records are exactly ``quantize`` with that rounding."""
    from hf_flexoffload.formats.compression import QuantConfig, quantize, to_bytes
    from hf_flexoffload.storage.kv_codec import TokenCodec

    config = QuantConfig(group_size=8, rounding=rounding)
    codec = TokenCodec((2, 1, 2, 16), torch.float32, config)
    assert codec.config.rounding == expected
    tokens = torch.randn(3, 2, 1, 2, 16)
    tokens[..., 0] *= 20  # an outlier per group: the two roundings differ
    resolved = QuantConfig(group_size=8, rounding=expected)
    assert torch.equal(codec.encode(tokens), to_bytes(quantize(tokens, resolved, lead_dims=1)))
    other = QuantConfig(group_size=8, rounding="search" if expected == "minmax" else "minmax")
    assert not torch.equal(codec.encode(tokens), to_bytes(quantize(tokens, other, lead_dims=1)))


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_compressed_unit_attends_over_dequantized_history(tmp_path, tier, bits):
    from hf_flexoffload.architectures.layers import attention
    from hf_flexoffload.formats.compression import QuantConfig, dequantize, quantize
    from hf_flexoffload.storage.transfer import Mover

    config = QuantConfig(bits=bits, group_size=4)
    cache = make_cache(tmp_path, Split(**{tier: 1.0}))
    cache.compress = config
    cache.allocate((3,))
    unit, mover = cache.units[0][0], Mover(torch.device("cpu"), overlap=True)
    assert unit.token_bytes < 2 * 3 * 2 * 4 * 4  # smaller than the fp32 token
    ks, vs = [], []
    for s in (5, 1, 1):
        q, k, v = (torch.randn(3, s, 2, 4) for _ in range(3))
        past_k = torch.cat(ks, 1) if ks else k[:, :0]
        past_v = torch.cat(vs, 1) if vs else v[:, :0]
        # Each token is quantized on its own (min-max), along the head dim; new tokens exact.
        minmax = QuantConfig(bits=bits, group_size=4, rounding="minmax")
        kq = dequantize(quantize(past_k, minmax)) if ks else past_k
        vq = dequantize(quantize(past_v, minmax)) if vs else past_v
        out = unit.attend(unit.fetch(), q, k, v, key_mask=None, mover=mover)
        keys = torch.cat([kq, k], 1).transpose(1, 2)
        values = torch.cat([vq, v], 1).transpose(1, 2)
        torch.testing.assert_close(out, attention(q.transpose(1, 2), keys, values, None))
        ks.append(k)
        vs.append(v)
    cache.drain()
    if tier == "disk":
        assert os.path.getsize(unit._path) == 7 * unit.token_bytes
    mover.close()
    cache.close()


CACHE_PLACEMENTS = {
    "device": dict(cache=Split(device=1.0)),
    "host_host_attention": dict(cache=Split(host=1.0), host_attention=True),
    "host_device_attention": dict(cache=Split(host=1.0), host_attention=False),
    "disk": dict(cache=Split(disk=1.0)),
    "mixed_micro_batches": dict(
        cache=Split(device=0.3, host=0.3, disk=0.4), micro_batch_size=2, num_micro_batches=3
    ),
    "everything_offloaded": dict(
        cache=Split(host=0.5, disk=0.5),
        weights=Split(host=0.5, disk=0.5),
        activations=Split(disk=1.0),
        micro_batch_size=2,
        num_micro_batches=3,
        overlap=False,
    ),
}


def _teacher_forced_logits(model, seq, mask, prompt):
    """Logits of every generated position, computed step by step through the cache."""
    out = model(seq[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache, logits = cache_from_output(out), [out.logits[:, -1]]
    for t in range(prompt, seq.shape[1] - 1):
        out = model(seq[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        logits.append(out.logits[:, -1])
    cache.close()
    return torch.stack(logits, 1)


# Documented in docs/compression.md: teacher-forced logits of the tiny test models, largest
# absolute error relative to the largest logit.
KV_TOLERANCE = {4: 0.15, 8: 0.01}


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_compressed_cache_logits_close_for_every_placement(checkpoint, bits):
    from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig

    from ..conftest import batch

    path, stock = checkpoint
    ids, mask = batch()
    new = 8
    seq = stock.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(len(seq), new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        reference = stock(seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    config = QuantConfig(bits=bits, group_size=16)  # the tiny models' head_dim
    results = {}
    for name, kw in CACHE_PLACEMENTS.items():
        policy = Policy(compress_cache=config, **kw)
        with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
            with torch.no_grad():
                results[name] = _teacher_forced_logits(model, seq, full_mask, ids.shape[1])
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=4)
            assert generated.shape == (len(ids), ids.shape[1] + 4)
    err = (results["device"] - reference).abs().max() / reference.abs().max()
    assert 0 < err <= KV_TOLERANCE[bits]
    for name, logits in results.items():  # where the cache lives changes nothing
        torch.testing.assert_close(logits, results["device"], atol=1e-4, rtol=1e-4, msg=name)


def test_compressed_cache_moves_compressed_bytes(pre_ln_checkpoint):
    from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig

    path, _ = pre_ln_checkpoint
    ids = torch.randint(3, 90, (4, 6))
    written = {}
    for name, compress in (("plain", None), ("4bit", QuantConfig(bits=4, group_size=16))):
        policy = Policy(cache=Split(disk=1.0), compress_cache=compress)
        with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
            model.generate(ids, max_new_tokens=4)
            written[name] = model.generation_stats.bytes_moved["host_to_disk"]
            expected = model.engine.kv_bytes(4, 6 + 3)  # the last token is never stored
            assert written[name] == expected
    # fp32 d=16: 64 bytes per head and token; 4-bit: 8 bytes of codes + 8 of scale/min.
    assert written["4bit"] == written["plain"] // 4


def test_host_attention_widens_history_into_reused_buffers():
    """fp16 history attended on the host is widened to fp32 in two reused buffers (keys,
    values), not a fresh copy per layer and micro-batch, and counted as host memory."""
    from hf_flexoffload.storage.kv_codec import HistoryBuffers

    counters = Counters()
    scratch = HistoryBuffers(torch.device("cpu"), counters)
    full = torch.randn(12, 2, 3, 2, 4).half()  # (S, 2, b, H_kv, d)
    keys, values = (full[:, i].permute(1, 2, 0, 3) for i in range(2))  # (b, H_kv, S, d)
    k1, v1 = scratch.widen(keys, values, torch.float32)
    assert k1.dtype == torch.float32 and torch.equal(k1, keys.float())
    assert torch.equal(v1, values.float())
    held = counters.live["host"]
    assert held == 2 * keys.numel() * 4
    shorter = full[:7]
    k2, v2 = scratch.widen(*(shorter[:, i].permute(1, 2, 0, 3) for i in range(2)), torch.float32)
    assert k2.data_ptr() == k1.data_ptr() and v2.data_ptr() == v1.data_ptr()
    assert torch.equal(v2, shorter[:, 1].permute(1, 2, 0, 3).float())
    assert counters.live["host"] == held
    scratch.close()
    assert counters.live["host"] == 0


def test_host_tier_buffer_is_allocated_pinned(tmp_path, monkeypatch):
    """On CUDA a pinned host tier makes history uploads asynchronous (``pinned_host_empty`` pins
    only on CUDA: here the request is what is checked)."""
    from hf_flexoffload.storage import kv_cache

    asked = []

    def pinned_host_empty(shape, dtype, device):
        asked.append(shape)
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(kv_cache, "pinned_host_empty", pinned_host_empty)
    unit = kv_cache.KVUnit(
        tier="host",
        batch=2,
        heads=2,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        host_attention=False,
        path=str(tmp_path / "kv"),
        counters=Counters(),
        capacity=4,
    )
    unit._append_memory(0, torch.randn(3, *unit.codec.record_shape))
    assert asked == [(4, *unit.codec.record_shape)]
