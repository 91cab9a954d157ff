"""load_plan: the compute dtype per device."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_flexoffload.planning import load_plan
from hf_flexoffload.planning.load_plan import gpu_dtype, resolve_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    "checkpoint, has_bf16, expected",
    [
        (torch.bfloat16, False, torch.float16),
        (torch.bfloat16, True, torch.bfloat16),
        (torch.float16, False, torch.float16),
        (torch.float32, False, torch.float32),
        (torch.float32, True, torch.float32),
    ],
    ids=["bf16_on_t4", "bf16_on_a100", "fp16_kept", "fp32_kept_t4", "fp32_kept_a100"],
)
def test_gpu_dtype(checkpoint, has_bf16, expected):
    assert gpu_dtype(checkpoint, has_bf16) == expected


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)]
)
def test_bf16_checkpoint_on_cuda_follows_the_capability(monkeypatch, caplog, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with caplog.at_level(logging.INFO, logger=load_plan.__name__):
        assert resolve_dtype(None, torch.bfloat16, GPU) == expected
        assert resolve_dtype("auto", torch.bfloat16, GPU) == expected
    assert ("float16" in caplog.text) == (expected == torch.float16)


def test_explicit_dtype_wins_with_a_warning_when_emulated(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level(logging.WARNING, logger=load_plan.__name__):
        assert resolve_dtype(torch.bfloat16, torch.float32, GPU) == torch.bfloat16
    assert "no native bf16" in caplog.text
    assert resolve_dtype("float32", torch.bfloat16, GPU) == torch.float32


def test_cpu_is_unchanged():
    assert resolve_dtype(None, torch.float16, CPU) == torch.bfloat16
    assert resolve_dtype(None, torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_dtype(None, torch.float32, CPU) == torch.float32
    with pytest.raises(ValueError, match="dtype="):
        resolve_dtype("int8", torch.float32, CPU)


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (9, 0)])
@pytest.mark.parametrize("checkpoint", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp32_and_fp16_checkpoints_keep_their_dtype_on_cuda(monkeypatch, capability, checkpoint):
    """Token equality with stock transformers: only bf16 on a GPU without it changes dtype."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype(None, checkpoint, GPU) == checkpoint


def test_the_capability_is_asked_of_the_compute_device(monkeypatch):
    """Two GPUs of different generations: the model's device decides, not the current one."""
    capabilities = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: capabilities[device.index]
    )
    assert resolve_dtype(None, torch.bfloat16, torch.device("cuda", 1)) == torch.float16
    assert resolve_dtype(None, torch.bfloat16, torch.device("cuda", 0)) == torch.bfloat16


def test_explicit_bf16_on_a_bf16_gpu_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with caplog.at_level(logging.INFO, logger=load_plan.__name__):
        assert resolve_dtype("bfloat16", torch.float16, GPU) == torch.bfloat16
    assert caplog.text == ""


@pytest.mark.parametrize(
    "device, requested, expected",
    [(CPU, None, torch.float16), (GPU, "auto", torch.float16), (CPU, "float32", torch.float32)],
    ids=["cpu_default", "gpu_auto", "explicit_wins"],
)
def test_compressed_checkpoint_computes_in_its_saved_dtype(device, requested, expected):
    """A compressed checkpoint's bytes were quantized from one dtype: by default it computes in
    that dtype (fp16 on a CPU too), whatever the device's preferred half precision."""
    from types import SimpleNamespace

    from hf_flexoffload.planning.load_plan import checkpoint_compute_dtype

    ckpt = SimpleNamespace(
        compression=SimpleNamespace(dtype=torch.float16), dtype=lambda: torch.uint8
    )
    assert checkpoint_compute_dtype(requested, ckpt, device) == expected
