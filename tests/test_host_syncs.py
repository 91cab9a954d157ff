"""Hidden device syncs on the hot path, caught on CPU.

On a GPU, any op that reads a tensor's values on the host (``bool(t)``, ``t.item()``,
``t.tolist()``, ``t.cpu()``, ``torch.unique``, boolean-mask indexing...) waits for every kernel
queued before it. ``torch.cuda.set_sync_debug_mode("error")`` catches those only on a GPU
(``test_cuda.py``); ``HostReads`` catches them here: the tensors a test marks as living on the
device, and everything computed from them, are watched, and every host read of one is recorded.
A move with ``.to(device)`` is not counted: here the compute device is the host, so a move to
it cannot be told from a copy to the host; ``.cpu()`` is counted.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hf_flexoffload.architectures import architecture_for
from hf_flexoffload.architectures.layers import attention, lookup
from hf_flexoffload.formats import rounding
from hf_flexoffload.formats.compression import (
    QuantConfig,
    QuantizedTensor,
    dequantize,
    from_bytes,
    quantize,
    to_bytes,
)
from hf_flexoffload.formats.quantized_matrix import linear, take_rows

from .conftest import tiny_config, tiny_llama_config
from .storage.test_streamed import streamed

# Ops that need a tensor's values on the host: on a GPU each is a device-to-host copy and a wait.
READS = frozenset(
    {
        "__bool__",
        "__float__",
        "__index__",
        "__int__",
        "allclose",
        "argwhere",
        "cpu",
        "equal",
        "item",
        "masked_select",
        "nonzero",
        "numpy",
        "tolist",
        "unique",
        "unique_consecutive",
    }
)
# Factories that put a new tensor where ``device=`` says: the compute device, in the code tested.
FACTORIES = frozenset({"empty", "full", "ones", "zeros", "arange", "rand", "randn", "tensor"})


class HostReads(TorchFunctionMode):
    """Records host reads of the watched tensors (see the module docstring).

    Args:
        watched: Tensors standing for device tensors.

    Attributes:
        reads: The names of the ops that read a watched tensor on the host, in order.
    """

    def __init__(self, *watched: torch.Tensor) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._ids: set[int] = set()
        self._keep: list[torch.Tensor] = []  # ids stay unique while the mode lives
        self._watch(watched)

    def _watch(self, value) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                self._ids.add(id(t))
                self._keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        leaves = tree_flatten((args, kwargs))[0]
        watched = any(isinstance(t, torch.Tensor) and id(t) in self._ids for t in leaves)
        to_host = name == "cpu"
        mask_index = name == "__getitem__" and _has_bool_index(args[1:])
        if watched and (name in READS or to_host or mask_index):
            self.reads.append(name if not mask_index else "boolean mask index")
        out = func(*args, **kwargs)
        if to_host and out is args[0]:
            out = out.clone()  # a new host tensor, as from a GPU (on CPU ``cpu()`` is a no-op)
        if watched and not to_host and name not in READS:
            self._watch(out)
            if name.endswith("_") or "out" in kwargs:  # in place: the target is on the device
                self._watch((args[0], kwargs.get("out")))
        elif not watched and name in FACTORIES and kwargs.get("device") is not None:
            self._watch(out)
        return out


def _has_bool_index(args: tuple) -> bool:
    leaves = tree_flatten(args)[0]
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in leaves)


# -- the detector itself -----------------------------------------------------------------------


def test_the_detector_sees_the_syncs_it_is_for():
    """Each of these would wait for a GPU; none of the bystanders (host tensors) is recorded."""
    x, host = torch.randn(8), torch.randn(8)
    with HostReads(x) as mode:
        if (x > 0).any():  # the round-up's old ``if low.any():``
            pass
        x.sum().item()
        x.tolist()
        torch.unique(x)
        y = x * 2
        y[y > 0]  # boolean-mask indexing (a nonzero)
        y.cpu()
        host.tolist(), bool(host.any())  # already on the host: free
    assert mode.reads == ["__bool__", "item", "tolist", "unique", "boolean mask index", "cpu"]


def _round_up_with_a_branch(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = values.to(dtype)
    low = out.float() < values
    if low.any():
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, math.inf)), out)
    return out


def test_the_old_branching_round_up_is_caught(monkeypatch):
    monkeypatch.setattr(rounding, "round_up", _round_up_with_a_branch)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    for mode_name in ("minmax", "search"):  # the search rounds min-max's pair up once too
        with HostReads(x) as mode:
            quantize(x, QuantConfig(bits=4, group_size=32, dim=0, rounding=mode_name))
        assert mode.reads == ["__bool__"]


# -- the hot path --------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding_mode", ["minmax", "search"])
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_compression_reads_nothing_on_the_host(dim, bits, dtype, rounding_mode):
    """Quantize (KV cache writes; weights with the search), dequantize, bytes round trip, row
    lookups and the chunked LM-head projection, on tensors that live on the device."""
    torch.manual_seed(0)
    x, ids = torch.randn(200, 48).to(dtype), torch.tensor([[3, 199, 3], [64, 0, 127]])
    inputs = torch.randn(2, 48, dtype=dtype)
    config = QuantConfig(bits=bits, group_size=32, dim=dim, rounding=rounding_mode)
    with HostReads(x, ids, inputs) as mode:
        q = quantize(x, config)  # 200 rows and 48 columns: padded groups either way
        back = from_bytes(to_bytes(q), q.format)
        dequantize(back, out=torch.empty_like(x))
        take_rows(back, ids)
        h = linear(inputs, back, chunk_rows=64)
    assert mode.reads == []
    assert torch.equal(take_rows(q, ids), dequantize(q)[ids])
    torch.testing.assert_close(h, inputs @ dequantize(q).t())


@pytest.mark.parametrize(
    "config",
    [
        tiny_llama_config(kv_heads=2),
        tiny_llama_config(
            kv_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=5e5,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        tiny_config("pre_ln"),
        tiny_config("post_ln"),
    ],
    ids=["llama-gqa", "llama3-rope-mqa", "opt-pre-ln", "opt-post-ln"],
)
def test_stage_math_reads_nothing_on_the_host(config):
    """Embedding, decoder layers (rotary angles, attention with padding, norms, MLP) and head,
    for a prefill and a decode step, with the token embedding (and a tied head) quantized."""
    arch = architecture_for(config)
    torch.manual_seed(0)
    stages = [
        {name: torch.randn(dims) * 0.1 for name, dims in tensors}
        for tensors in arch.stage_tensors()
    ]
    embed = quantize(stages[0]["embed_tokens.weight"], QuantConfig(bits=4, group_size=32, dim=0))
    stages[0]["embed_tokens.weight"] = embed
    for local in arch.head_aliases():
        stages[-1][local] = embed
    ids, mask = torch.tensor([[5, 9, 2], [1, 1, 7]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    positions = (mask.cumsum(1) * mask - 1).clamp(min=0)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    step = {}

    def attend(q, k, v, scale=1.0):  # (b, s, H, d) in, as the KV cache units do
        if step["layer"] in cache:
            old_k, old_v = cache[step["layer"]]
            k, v = torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1)
        cache[step["layer"]] = k, v
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, H, S, d) for attention
        return attention(q, k, v, step["key_mask"], scale)

    leaves = [t for w in stages for v in w.values() for t in _leaves(v)]
    with HostReads(*leaves, ids, mask, positions) as mode:
        new_ids, new_positions, step["key_mask"] = ids, positions, mask
        for _ in range(2):  # prefill, then one decode step
            x = arch.embed(stages[0], new_ids, new_positions)
            for layer in range(1, arch.layers + 1):
                step["layer"] = layer
                x = arch.decoder_layer(stages[layer], x, new_positions, attend)
            logits = arch.head(stages[-1], x)
            new_ids = logits[:, -1:].argmax(-1)
            new_positions = new_positions[:, -1:] + 1
            step["key_mask"] = torch.cat([step["key_mask"], torch.ones_like(new_ids)], 1)
    assert mode.reads == []
    assert logits.shape == (2, 1, arch.vocab) and torch.isfinite(logits).all()


def _leaves(value) -> tuple[torch.Tensor, ...]:
    """The plain tensors a weight is made of."""
    if isinstance(value, QuantizedTensor):
        return value.codes, value.scale, value.minimum
    return (value,)


def test_streamed_lookup_copies_the_ids_to_the_host_once(tmp_path):
    """The host reads rows, so it needs the ids: one explicit copy, then nothing else of what
    lives on the device is read (rows from all three tiers, repeated ids)."""
    whole = torch.randn(301, 8)
    matrix, _ = streamed(tmp_path, whole, torch.float32, rows_per_chunk=37)
    ids = torch.tensor([[300, 0, 150, 151], [7, 7, 299, 60]])
    with HostReads(ids) as mode:
        rows = lookup(matrix, ids)
    assert mode.reads == ["cpu"]
    assert torch.equal(rows, torch.nn.functional.embedding(ids, whole))


def test_a_forward_copies_the_ids_to_the_host_once_for_streamed_embeddings(pre_ln_checkpoint):
    """Streamed embeddings choose their rows on the host: the engine copies the block's ids and
    positions there once per forward, not once per lookup per micro-batch (each such copy
    waits for everything the GPU has queued, the previous micro-batches' work included)."""
    from transformers import OPTForCausalLM

    from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

    from .conftest import batch

    path, _ = pre_ln_checkpoint
    stock = OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = batch(rows=4, pad=False)
    policy = Policy(weights=Split(disk=1.0), micro_batch_size=2)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, dtype=torch.float32
    ) as model:
        assert model._engine.fetcher.streams(0)  # token and position embeddings, on disk
        with HostReads(ids, mask) as mode:
            logits = model(input_ids=ids, attention_mask=mask).logits
    assert mode.reads.count("cpu") == 1
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
