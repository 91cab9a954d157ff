import math
from dataclasses import replace

import pytest
import torch

from hf_flexoffload.formats import quantized_matrix, rounding
from hf_flexoffload.formats.compression import (
    QuantConfig,
    QuantFormat,
    dequantize,
    from_bytes,
    pack_codes,
    quantize,
    to_bytes,
    unpack_codes,
)
from hf_flexoffload.formats.quantized_matrix import linear, quantize_rows_to_bytes, take_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUNDINGS = ("minmax", "search")
SHAPES = [((256, 128), 0), ((7, 33, 5), 1), ((3, 130), -1), ((100,), 0), ((1, 1), 0)]


def _group_bound(x: torch.Tensor, q) -> torch.Tensor:
    """Per-element allowed error: half the step of the element's group, plus one rounding of the
    output dtype."""
    fmt = q.format
    pre, groups, size, post = fmt.dims
    n = fmt.shape[fmt.config.dim]
    step = q.scale.float().reshape(pre, groups, 1, post).expand(pre, groups, size, post)
    step = step.reshape(pre, groups * size, post)[:, :n].reshape(fmt.shape)
    return step / 2 + torch.finfo(x.dtype).eps * x.float().abs() + 1e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("shape", "dim"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("group_size", [2, 64], ids=["g2", "g64"])
def test_minmax_round_trip_error_is_within_half_a_step(dtype, shape, dim, bits, group_size):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    q = quantize(x, QuantConfig(bits=bits, group_size=group_size, dim=dim, rounding="minmax"))
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == dtype
    err = (y.float() - x.float()).abs()
    assert torch.all(err <= _group_bound(x, q)), err.max()
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "x",
    [torch.zeros(64, 32), torch.full((65, 3), -2.5), torch.ones(5, 130)],
    ids=["zeros", "constant_padded", "ones_last_dim"],
)
@pytest.mark.parametrize("mode", ROUNDINGS)
def test_constant_groups_are_exact(dtype, x, mode):
    x = x.to(dtype)
    for dim in (0, -1):
        q = quantize(x, QuantConfig(group_size=64, dim=dim, rounding=mode))
        assert torch.equal(q.scale, torch.zeros_like(q.scale))
        assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("mode", ROUNDINGS)
def test_constant_group_inside_varying_tensor_is_exact(mode):
    x = torch.randn(128, 4)
    x[:64, 1] = 0.7  # one group along dim 0 is constant
    y = dequantize(quantize(x, QuantConfig(group_size=64, dim=0, rounding=mode)))
    assert torch.equal(y[:64, 1], x[:64, 1])


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_packing_is_exact(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64, 7), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8, 7)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_quantized_codes_survive_pack_and_unpack():
    x = torch.randn(64, 8)
    q = quantize(x, QuantConfig(bits=4, group_size=16, dim=0))
    codes = unpack_codes(q.codes, 4, dim=3)
    assert codes.max() <= 15
    assert torch.equal(unpack_codes(pack_codes(codes, 4, dim=3), 4, dim=3), codes)


def test_default_config_groups_32_input_channels():
    assert QuantConfig() == QuantConfig(bits=4, group_size=32, dim=None, rounding=None)
    w = torch.randn(8, 128)
    w[3] *= 100  # one output row is huge: groups along the rows keep the other rows precise
    q = quantize(w, QuantConfig())
    assert q.format.config.dim == 1
    assert q.scale.shape == (1, 8, 4, 1, 1)  # (records, rows, groups of 32, 1, 1)
    err = (dequantize(q) - w).abs()
    assert err[[0, 1, 2, 4]].max() < 0.25
    assert err[3].max() > 1  # its own groups are a hundred times coarser


def test_output_channel_groups_stay_available():
    w = torch.randn(128, 8)
    w[:, 3] *= 100  # one input column is huge: per-column groups keep other columns precise
    q = quantize(w, QuantConfig(group_size=64, dim=0))
    assert q.format.config.dim == 0
    err = (dequantize(q) - w).abs()
    assert err[:, [0, 1, 2, 4]].max() < 0.25


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_byte_format_round_trip(dtype):
    x = torch.randn(130, 10).to(dtype)
    q = quantize(x, QuantConfig(group_size=64), default_dim=0)
    data = to_bytes(q)
    assert data.dtype == torch.uint8 and data.shape == (q.format.nbytes,)
    assert torch.equal(dequantize(from_bytes(data, q.format)), dequantize(q))


def test_records_are_independent():
    # The KV cache quantizes each token on its own: record i must only depend on token i.
    x = torch.randn(5, 2, 3, 4, 16, dtype=torch.bfloat16)  # (s, 2, b, H, d)
    config = QuantConfig(group_size=8)
    whole = to_bytes(quantize(x, config, lead_dims=1))
    fmt = QuantFormat.of(x.shape, x.dtype, config)
    assert whole.shape == (5, fmt.record_bytes(1))
    for i in range(5):
        alone = to_bytes(quantize(x[i : i + 1], config, lead_dims=1))
        assert torch.equal(alone[0], whole[i])
    history = from_bytes(whole[:3], QuantFormat.of((3, *x.shape[1:]), x.dtype, config))
    assert torch.equal(dequantize(history), dequantize(quantize(x[:3], config)))


def test_dequantize_into_out():
    x = torch.randn(3, 130, dtype=torch.bfloat16)
    q = quantize(x, QuantConfig(group_size=64))
    out = torch.empty_like(x)
    assert dequantize(q, out=out) is out
    assert torch.equal(out, dequantize(q))


def test_compressed_size_is_31_percent_of_bf16_by_default():
    fmt = QuantFormat.of((2048, 8192), torch.bfloat16, QuantConfig())
    assert fmt.nbytes / fmt.plain_nbytes == pytest.approx(5 / 16)  # 4 + 2 * 16 / 32 bits
    fmt = QuantFormat.of((2048, 8192), torch.bfloat16, QuantConfig(bits=4, group_size=64), 0)
    assert fmt.nbytes / fmt.plain_nbytes == pytest.approx(0.28125)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=3), "QuantConfig.bits"),
        (dict(group_size=63), "QuantConfig.group_size"),
        (dict(group_size=0), "QuantConfig.group_size"),
        (dict(dim="0"), "QuantConfig.dim"),
        (
            dict(rounding="nearest"),
            r"Invalid QuantConfig.rounding='nearest': allowed values are None, 'minmax', 'search'",
        ),
    ],
    ids=["bits", "odd_group", "zero_group", "dim_type", "rounding"],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_dim_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        quantize(torch.randn(4, 4), QuantConfig(dim=2))


def test_records_must_not_cut_groups():
    with pytest.raises(ValueError, match="cut groups"):
        quantize(torch.randn(4, 4), QuantConfig(group_size=2, dim=0), lead_dims=1)


@pytest.mark.parametrize("dim", [0, 1], ids=["groups_down_rows", "groups_along_rows"])
def test_take_rows_equals_indexing_the_dequantized_matrix(dim):
    table = torch.randn(200, 24)  # 200 rows: the last group is padded
    q = quantize(table, QuantConfig(group_size=8 if dim else 64, dim=dim))
    ids = torch.tensor([[0, 199, 5], [64, 64, 130]])
    assert torch.equal(take_rows(q, ids), dequantize(q)[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("dim", "group_size"), [(0, 64), (1, 16)], ids=["dim0", "dim1"])
@pytest.mark.parametrize("chunk_rows", [64, 100, 4096], ids=["chunk_64", "chunk_100", "one_chunk"])
def test_chunked_linear_equals_linear_on_the_dequantized_weight(
    monkeypatch, chunk_rows, dim, group_size, dtype
):
    """200 rows in chunks of 64 or 100: a ragged last chunk; dim 0's last group is padded,
    and so is every row's last group with dim 1 (24 columns, groups of 16)."""
    weight = torch.randn(200, 24).to(dtype)
    q = quantize(weight, QuantConfig(group_size=group_size, dim=dim))
    x = torch.randn(3, 5, 24).to(dtype)
    expected = torch.nn.functional.linear(x, dequantize(q))
    rows = []

    def counted(part, out=None):
        rows.append(part.format.shape[0])
        return dequantize(part, out=out)

    monkeypatch.setattr(quantized_matrix, "dequantize", counted)
    torch.testing.assert_close(linear(x, q, chunk_rows=chunk_rows), expected)
    step = chunk_rows if dim == 1 else chunk_rows // group_size * group_size
    assert max(rows) == min(step, 200) and sum(rows) == 200


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_dequantize_rounds_once_from_fp32(dtype, dim):
    """Whichever addcmul path the layout takes (dim 1 spreads the minimums first), the values
    are fp32 ``min + code * scale`` rounded once to the dtype. (80 rows: not the int4 kernel's
    layout, which needs multiples of 32; tests/formats/test_int4_tiled.py covers that one.)"""
    rows = 80 if dim == 1 else 96  # whole groups either way
    q = quantize(torch.randn(rows, 64).to(dtype), QuantConfig(group_size=32, dim=dim))
    codes = unpack_codes(q.codes, 4, dim=3).float()
    exact = (q.minimum.float() + codes * q.scale.float()).to(dtype)
    assert torch.equal(dequantize(q), exact.reshape(rows, 64))


@pytest.mark.parametrize("mode", ROUNDINGS)
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blockwise_quantization_gives_the_same_bytes(dim, bits, dtype, mode):
    matrix = torch.randn(203, 40).to(dtype)  # the last group along dim 0 is padded
    config = QuantConfig(bits=bits, group_size=16, dim=dim, rounding=mode)
    fmt = QuantFormat.of(matrix.shape, dtype, config)
    reads = []

    def read(start, stop):
        reads.append(stop - start)
        return matrix[start:stop]

    blockwise = quantize_rows_to_bytes(read, fmt, block_bytes=1000)
    assert len(reads) > 3 and max(reads) < 203
    assert torch.equal(blockwise, to_bytes(quantize(matrix, config)))


# -- rounding: min-max and the search ----------------------------------------------------------


def _group_errors(x: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Per group, the summed squared error of ``dequantize(quantize(x))`` (fp64; padding, being
    cut off by dequantize, counts nothing)."""
    q = quantize(x, config)
    fmt = q.format
    pre, groups, size, post = fmt.dims
    n = fmt.shape[fmt.config.dim]
    err = (dequantize(q).double() - x.double()).square().reshape(pre, n, post)
    padded = torch.zeros(pre, groups * size, post, dtype=torch.float64)
    padded[:, :n] = err
    return padded.reshape(pre, groups, size, post).sum(2)


def _with_outliers(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    spikes = torch.rand(shape, generator=generator) < 0.02
    return torch.where(spikes, x * 20, x)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("shape", "dim", "group_size"),
    [((112, 64), 1, 32), ((96, 64), 0, 32), ((40, 70), 1, 16), ((7, 33, 5), 1, 8)],
    ids=["rows", "columns", "rows_padded", "3d_padded"],
)
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_search_never_has_more_error_than_minmax(seed, shape, dim, group_size, bits):
    x = _with_outliers(shape, seed)
    config = QuantConfig(bits=bits, group_size=group_size, dim=dim)
    searched = _group_errors(x, replace(config, rounding="search"))
    plain = _group_errors(x, replace(config, rounding="minmax"))
    # fp32 sums in another order than fp64's: a relative slack far below any real difference
    assert torch.all(searched <= plain * (1 + 1e-5) + 1e-12)
    assert searched.sum() < (0.9 if bits == 4 else 0.97) * plain.sum()  # and clearly better


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_search_is_no_worse_than_minmax_in_half_precision(dtype):
    """The comparison with min-max uses the values as dequantize returns them, rounded to the
    dtype (for outliers of ~60 a bf16 step is 0.25, as much as a group's whole 4-bit error)."""
    x = _with_outliers((48, 256), 7).to(dtype)  # 48 rows: the generic layout
    searched = _group_errors(x, QuantConfig(rounding="search"))
    plain = _group_errors(x, QuantConfig(rounding="minmax"))
    assert torch.all(searched <= plain * (1 + 1e-5) + 1e-12)
    assert searched.sum() < 0.9 * plain.sum()


def test_search_keeps_a_group_already_on_a_grid():
    """Weights that were 4-bit min-max quantized with these groups (SmolLM2's Q4_1 blocks of
    32 are) come back as they were, up to fp32 rounding of the scale, as with min-max."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 4, 32), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans all levels
    scale = torch.rand(48, 4, 1, generator=generator) / 8
    low = torch.randn(48, 4, 1, generator=generator)
    x = (low + codes * scale).reshape(48, 128)  # 48 rows: the generic layout (exact pairs)
    searched = _group_errors(x, QuantConfig())
    assert torch.all(searched <= _group_errors(x, QuantConfig(rounding="minmax")) * (1 + 1e-5))
    assert searched.sum().sqrt() < 1e-6 * x.norm()


def test_search_shrinks_a_range_stretched_by_an_outlier():
    x = torch.tensor([[0.0, 0.1, 0.2, 0.3, 3.0, 0.25]])
    grouped = x.reshape(1, 1, 6, 1)
    scale, low = rounding.search(grouped, 3, torch.float32)
    minmax_scale, _ = rounding.minmax(grouped, 3, torch.float32)
    assert scale < minmax_scale  # the five small values share levels instead of level 0
    error = rounding.squared_error(grouped, scale, low, 3)
    assert error < 0.3 * rounding.squared_error(
        grouped, *rounding.minmax(grouped, 3, torch.float32), 3
    )


def test_search_stores_scale_and_minimum_in_the_dtype():
    x = _with_outliers((16, 64), 1).to(torch.float16)
    q = quantize(x, QuantConfig())
    assert q.scale.dtype == q.minimum.dtype == torch.float16
    assert torch.all(q.scale >= 0)


def test_scales_round_up_so_no_group_is_clipped():
    """fp32 -> bf16 rounding of a group's range goes towards +inf (branch-free, the same result
    whether or not any value needed it)."""
    values = torch.tensor([1.0, 1.0 + 2**-10, 3.0, -1.0 - 2**-12])
    out = rounding.round_up(values, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.all(out.float() >= values)
    assert torch.equal(out[[0, 2]].float(), values[[0, 2]]), "exact values stay"
    assert out[1].float() == 1.0 + 2**-7, "rounded up to the next bf16"


def _round_up_with_a_branch(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The round-up as it was before it became branch-free (``if low.any()``: a device wait)."""
    out = values.to(dtype)
    low = out.float() < values
    if low.any():
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, math.inf)), out)
    return out


@pytest.mark.parametrize("mode", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_branch_free_round_up_quantizes_identically(monkeypatch, dtype, bits, mode):
    """Same bytes as the branching round-up, for groups whose range needs rounding up, groups
    that do not (fp32 never does), all-negative groups and constant groups."""
    torch.manual_seed(0)
    x = torch.randn(64, 96) * 3
    x[:16] = -x[:16].abs() - 5  # groups entirely below zero
    x[16:24] = -2.5  # constant groups: zero range
    x = x.to(dtype)
    config = QuantConfig(bits=bits, group_size=32, dim=1, rounding=mode)
    ours = to_bytes(quantize(x, config))
    monkeypatch.setattr(rounding, "round_up", _round_up_with_a_branch)
    assert torch.equal(ours, to_bytes(quantize(x, config)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_and_dequantize_do_not_sync_on_cuda():
    cuda = torch.device("cuda", 0)
    x = (torch.randn(64, 256) * 3).to(cuda, torch.float16)
    config = QuantConfig(bits=4, group_size=64, dim=0)
    expected = quantize(x.cpu(), config)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = quantize(x, config)
        y = dequantize(q)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(to_bytes(q).cpu(), to_bytes(expected))
    assert torch.equal(y.cpu(), dequantize(expected))
