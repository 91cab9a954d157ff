"""4-bit weights in the CPU int4 kernel's layout: the format, the kernel path, and its use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig, Split
from hf_flexoffload.architectures import architecture_for
from hf_flexoffload.formats import int4_tiled
from hf_flexoffload.formats.compression import (
    QuantFormat,
    QuantizedTensor,
    dequantize,
    from_bytes,
    quantize,
    to_bytes,
)
from hf_flexoffload.formats.quantized_matrix import linear, quantize_rows_to_bytes, take_rows
from hf_flexoffload.planning.int4_kernel_choice import KERNEL_PROBE_ROWS, crossover, kernel_rows
from hf_flexoffload.storage.weight_layout import layout_for

from ..conftest import batch, tiny_config

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    not int4_tiled.kernel_available(CPU), reason="this torch has no CPU int4 kernel"
)


def tiled(rows=96, cols=128, group=32, dtype=torch.float32, seed=0, rounding="minmax"):
    torch.manual_seed(seed)
    x = torch.randn(rows, cols).to(dtype)
    config = QuantConfig(bits=4, group_size=group, dim=1, rounding=rounding)
    return x, quantize(x, config)


TILEABLE = {
    "g32": ((64, 128), 4, 1, 32, True),
    "g256": ((32, 512), 4, 1, 256, True),
    "output_channel_groups": ((64, 128), 4, 0, 32, False),
    "8_bit": ((64, 128), 8, 1, 32, False),
    "rows_not_a_multiple_of_32": ((48, 128), 4, 1, 32, False),
    "group_not_dividing_cols": ((64, 96), 4, 1, 64, False),
    "group_the_kernel_lacks": ((64, 128), 4, 1, 16, False),
    "not_a_matrix": ((2, 64, 128), 4, 2, 32, False),
}


@pytest.mark.parametrize(("shape", "bits", "dim", "group", "ok"), TILEABLE.values(), ids=TILEABLE)
def test_which_weights_take_the_kernel_layout(shape, bits, dim, group, ok):
    assert int4_tiled.tileable(shape, bits, dim, group) is ok
    q = quantize(torch.randn(shape), QuantConfig(bits=bits, group_size=group, dim=dim))
    assert isinstance(q, int4_tiled.TiledInt4 if ok else QuantizedTensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_is_within_half_a_step_of_the_stored_scale(dtype, group):
    x, q = tiled(group=group, dtype=dtype)
    out = dequantize(q)
    assert out.dtype == dtype and out.shape == x.shape
    step = q.scale_zero[..., 0].t().float().repeat_interleave(group, dim=1)  # (N, K)
    # Half a step, plus the bf16 rounding of the stored zero (a group's midpoint).
    slack = step / 2 + x.float().abs().amax() * 2**-8
    assert ((out.float() - x.float()).abs() <= slack).all()


def test_bytes_are_the_kernel_operands_and_round_trip():
    _, q = tiled()
    data = to_bytes(q)
    assert data.numel() == q.format.nbytes == 96 * 128 // 2 + 4 * 96 * 128 // 32
    back = from_bytes(data, q.format)
    assert back.codes.data_ptr() - data.data_ptr() == 4 * 96 * 128 // 32  # views, no copy
    assert torch.equal(dequantize(back), dequantize(q))


@pytest.mark.parametrize("rows", [128, 96], ids=["fills_every_tile", "rows_of_32_only"])
def test_kernel_codes_are_torchs_own_packing_on_this_cpu(rows):
    """The stored 32-row tiles are re-tiled where this CPU's kernel takes 64-row ones (its
    AVX-512 code): what the kernel reads is exactly torch's own packing of the same codes."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    _, q = tiled(rows=rows)
    codes = int4_tiled.unpack_codes(q.codes).to(torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    ours = int4_tiled.kernel_codes(q)
    if rows % int4_tiled.kernel_block():
        assert ours is None  # matmul takes the dequantizing path instead
    else:
        assert torch.equal(theirs, ours)
    if int4_tiled.kernel_block() == int4_tiled.BLOCK:
        assert ours.data_ptr() == q.codes.data_ptr(), "the stored bytes, as they are"


def test_blockwise_quantization_gives_the_same_bytes():
    x, q = tiled(rows=160)
    fmt = q.format
    blocks = quantize_rows_to_bytes(lambda a, b: x[a:b], fmt, block_bytes=64 * 128 * 4)
    assert torch.equal(blocks, to_bytes(q))


def test_take_rows_equals_indexing_the_dequantized_matrix():
    _, q = tiled()
    index = torch.tensor([[0, 17, 95], [33, 48, 63]])
    assert torch.equal(take_rows(q, index), dequantize(q)[index])


@pytest.mark.parametrize("chunk_rows", [32, 40, 4096], ids=["one_tile", "rounded", "whole"])
def test_chunked_linear_equals_linear_on_the_dequantized_weight(chunk_rows):
    _, q = tiled()
    x = torch.randn(3, 5, 128)
    expected = F.linear(x, dequantize(q))
    torch.testing.assert_close(linear(x, q, chunk_rows=chunk_rows), expected)


@needs_kernel
@pytest.mark.parametrize("rows", [128, 96], ids=["fills_every_tile", "rows_of_32_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_dequantizing_path_to_bf16_precision(dtype, rows):
    _, q = tiled(rows=rows, dtype=dtype)
    x = torch.randn(2, 7, 128).to(dtype)
    got = int4_tiled.matmul(x, q)
    assert got.dtype == dtype and got.shape == (2, 7, rows)
    # The kernel's inputs are x in bf16: against that, only its bf16 output rounding remains.
    expected = F.linear(x.bfloat16().float(), dequantize(q).float())
    # bf16 keeps 8 significant bits: a few units in the last place of the largest output.
    atol = 4 * 2**-8 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=0)
    assert (got.float() - expected).abs().mean() < atol / 8


def test_crossover_is_the_last_count_the_kernel_wins_at_every_smaller_one():
    kernel = {1: 10.0, 2: 10.0, 4: 9.0, 8: 3.0, 16: 20.0}
    dense = {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0}
    assert crossover(kernel, dense) == 4
    assert crossover({}, {}) == 0


def test_kernel_rows_pinned_by_the_policy_or_measured():
    arch = architecture_for(tiny_config())
    q4 = Policy(compress_weights=QuantConfig(dim=1, group_size=32))
    tiled_layouts = layout_for(arch, q4, torch.float32)
    plain = layout_for(arch, Policy(), torch.float32)
    available = int4_tiled.kernel_available(CPU)
    shape = (64, 128)
    assert kernel_rows(7, tiled_layouts, CPU, torch.float32, shape) == (7 if available else 0)
    assert kernel_rows(0, tiled_layouts, CPU, torch.float32, shape) == 0
    assert kernel_rows(7, plain, CPU, torch.float32, shape) == 0  # nothing in that layout
    measured = kernel_rows(None, tiled_layouts, CPU, torch.float32, shape)
    assert measured in (0, *KERNEL_PROBE_ROWS)


@needs_kernel
@pytest.mark.parametrize(
    ("pinned", "calls"),
    [(0, "none"), (5, "decode"), (4096, "all")],
    ids=["never", "decode_rows_only", "always"],
)
def test_the_kernel_runs_exactly_in_steps_within_its_rows(
    monkeypatch, pre_ln_checkpoint, pinned, calls
):
    path, _ = pre_ln_checkpoint
    rows_seen = []
    real = int4_tiled.matmul

    def spy(x, q):
        rows_seen.append(x.numel() // x.shape[-1])
        return real(x, q)

    monkeypatch.setattr(int4_tiled, "matmul", spy)
    ids, mask = batch()  # 5 sequences of 7 tokens: prefill computes 35 rows, decode 5
    policy = Policy(
        compress_weights=QuantConfig(group_size=32, dim=1),
        weights=Split(host=1.0),
        micro_batch_size=5,
        int4_kernel_rows=pinned,
    )
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    if calls == "none":
        assert rows_seen == []
    elif calls == "decode":
        assert rows_seen and set(rows_seen) <= {5}
    else:
        assert 35 in rows_seen and 5 in rows_seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_search_lowers_the_error_in_the_kernel_layout_too(dtype):
    torch.manual_seed(3)
    x = torch.randn(64, 256)
    x[torch.rand_like(x) < 0.02] *= 12  # outliers stretch min-max ranges
    x = x.to(dtype)
    errors = {}
    for mode in ("minmax", "search"):
        q = quantize(x, QuantConfig(group_size=32, dim=1, rounding=mode))
        assert isinstance(q, int4_tiled.TiledInt4)
        errors[mode] = (dequantize(q).double() - x.double()).pow(2).sum().item()
    # Clearly lower, though the search minimizes an error weighted towards large elements.
    assert errors["search"] < 0.9 * errors["minmax"]


def test_a_matrix_not_tiled_as_a_whole_is_quantized_generically_block_by_block():
    # 80 rows: not the kernel's layout, though a block of 32 or 64 of its rows would be.
    x = torch.randn(80, 128)
    fmt = QuantFormat.of((80, 128), torch.float32, QuantConfig(group_size=32))
    assert not fmt.tiled
    blocks = quantize_rows_to_bytes(lambda a, b: x[a:b], fmt, block_bytes=64 * 128 * 4)
    assert torch.equal(blocks, to_bytes(quantize(x, fmt.config)))
