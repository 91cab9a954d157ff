"""dtype="auto": the compute dtype chosen by measurement, against stock transformers' tokens."""

from __future__ import annotations

import copy
import logging
import tempfile

import pytest
import torch
from transformers import OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures import architecture_for
from hf_flexoffload.checkpoints.checkpoint import open_checkpoint
from hf_flexoffload.planning.cost_model import Estimate
from hf_flexoffload.planning.dtype_choice import (
    CHECKPOINT,
    COMPRESSED,
    MEASURED,
    REQUESTED,
    candidate_dtypes,
    choose_dtype,
)
from hf_flexoffload.planning.load_plan import plan_load

from ..conftest import batch
from .test_hardware import seed_profile

CPU = torch.device("cpu")
SLOW = {1: 1e9, 16: 5e9, 256: 10e9}
FAST = {rows: 20 * rate for rows, rate in SLOW.items()}
WORKLOAD = Workload(prompt_len=8, gen_len=4)


def fake_estimate(tokens_per_second: float) -> Estimate:
    return Estimate(
        block_size=1,
        prefill_seconds=1.0,
        decode_seconds=1.0,
        tokens_per_second=tokens_per_second,
        peak_bytes={"device": 0, "host": 0, "disk": 0},
        layer_seconds={"compute": 1.0},
        page_cached=False,
    )


# -- the pure choice -----------------------------------------------------------------------------


def test_candidates_per_device():
    assert candidate_dtypes("cpu") == (torch.float32, torch.bfloat16)  # never fp16 on a CPU
    assert candidate_dtypes("cuda", has_bf16=False) == (torch.float32, torch.float16)
    assert candidate_dtypes("cuda", has_bf16=True) == (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    )


@pytest.mark.parametrize(
    "fp32, bf16, expected",
    [(10.0, 40.0, torch.bfloat16), (40.0, 10.0, torch.float32), (10.0, 10.0, torch.float32)],
    ids=["bf16_faster", "fp32_faster", "tie_keeps_the_wider"],
)
def test_the_fastest_predicted_wins(fp32, bf16, expected):
    estimates = {torch.float32: fake_estimate(fp32), torch.bfloat16: fake_estimate(bf16)}
    assert choose_dtype(estimates) == expected


def test_nothing_to_choose_from_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        choose_dtype({})


# -- planning with seeded profiles ---------------------------------------------------------------


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """Seed this test's own profile cache: ``profiles(fp32_rates, bf16_rates)``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(cache))

    def seed(fp32: dict, bf16: dict, matrix: tuple[int, int] = (64, 128)) -> None:
        for dtype, rates in ((torch.float32, fp32), (torch.bfloat16, bf16)):
            seed_profile(cache, tempfile.gettempdir(), matrix, dtype, matmul_flops=rates)

    return seed


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, pre_ln_checkpoint):
    _, stock = pre_ln_checkpoint
    path = tmp_path_factory.mktemp("opt-bf16")
    copy.deepcopy(stock).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def plan(path: str, policy, dtype):
    ckpt = open_checkpoint(path)
    arch = architecture_for(OPTForCausalLM.config_class.from_pretrained(path))
    return plan_load(arch, ckpt, policy, dtype, CPU, None, None, WORKLOAD)


@pytest.mark.parametrize(
    "fast, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)], ids=["bf16", "fp32"]
)
@pytest.mark.parametrize("policy", ["auto", Policy(weights=Split(disk=1.0))], ids=["auto", "fixed"])
def test_auto_takes_the_dtype_with_more_measured_throughput(
    bf16_checkpoint, profiles, caplog, fast, expected, policy
):
    profiles(SLOW if fast == "bf16" else FAST, FAST if fast == "bf16" else SLOW)
    with caplog.at_level(logging.INFO, logger="hf_flexoffload.planning.load_plan"):
        planned = plan(bf16_checkpoint, policy, "auto")
    assert planned.dtype == expected and planned.choice.reason == MEASURED
    assert planned.storage == torch.bfloat16, "stored in the checkpoint's dtype either way"
    speeds = {c.dtype: c.estimate.tokens_per_second for c in planned.choice.candidates}
    assert set(speeds) == {torch.float32, torch.bfloat16}
    assert speeds[expected] > speeds[({torch.float32, torch.bfloat16} - {expected}).pop()]
    assert planned.estimate.tokens_per_second == speeds[expected]
    assert planned.profile.dtype == str(expected).removeprefix("torch.")
    if policy != "auto":
        assert planned.policy == policy
    assert "dtype='auto' chose" in caplog.text and "GFLOP/s" in caplog.text


def test_an_explicit_dtype_wins_and_measures_nothing(bf16_checkpoint, profiles):
    profiles(SLOW, FAST)  # bf16 would win
    for dtype in (torch.float32, "float32"):
        planned = plan(bf16_checkpoint, Policy(), dtype)
        assert planned.dtype == torch.float32 and planned.choice.reason == REQUESTED
        assert planned.estimate is None and planned.storage == torch.bfloat16


def test_none_keeps_the_checkpoints_dtype(pre_ln_checkpoint, bf16_checkpoint, profiles):
    profiles(FAST, SLOW)  # fp32 would win
    planned = plan(bf16_checkpoint, "auto", None)
    assert planned.dtype == torch.bfloat16 and planned.choice.reason == CHECKPOINT
    assert [c.dtype for c in planned.choice.candidates] == [torch.bfloat16]
    profiles(SLOW, FAST)  # bf16 would win
    assert plan(pre_ln_checkpoint[0], Policy(), None).dtype == torch.float32


def test_a_compressed_checkpoint_keeps_its_saved_dtype(pre_ln_checkpoint, tmp_path, profiles):
    profiles(SLOW, FAST)  # bf16 would win
    path, _ = pre_ln_checkpoint
    policy = Policy(compress_weights=QuantConfig(group_size=32))
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.save_compressed(tmp_path / "q")
    planned = plan(str(tmp_path / "q"), policy, "auto")
    assert planned.dtype == torch.float32 and planned.choice.reason == COMPRESSED
    with FlexOffloadOPTForCausalLM.from_pretrained(
        tmp_path / "q", offload_policy=policy, dtype="auto"
    ) as model:
        assert model.dtype == torch.float32


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fast, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)], ids=["bf16", "fp32"]
)
def test_auto_generates_stock_tokens_in_the_chosen_dtype(
    pre_ln_checkpoint, profiles, fast, expected
):
    """An fp32 checkpoint loaded with dtype="auto" generates what stock transformers generates
    when loaded in the dtype that was chosen, with its logits (fp32 and bf16 logits of this
    model differ by ~0.06: the logits tell the dtypes apart where the greedy tokens do not)."""
    path, _ = pre_ln_checkpoint
    profiles(SLOW if fast == "bf16" else FAST, FAST if fast == "bf16" else SLOW)
    ids, mask = batch()
    stock = OPTForCausalLM.from_pretrained(path, dtype=expected).eval()
    want = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want_logits = stock(ids, attention_mask=mask).logits[mask.bool()].float()
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy="auto", dtype="auto", workload=WORKLOAD
    ) as model:
        assert model.dtype == expected and model.config.dtype == expected
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        logits = model(ids, attention_mask=mask).logits[mask.bool()].float()
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, atol=1e-3, rtol=0)
