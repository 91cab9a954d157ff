"""AutoFlexOffloadModelForCausalLM: the class follows the checkpoint's model type."""

from __future__ import annotations

import pytest
from transformers import GPT2Config

from hf_flexoffload import (
    AutoFlexOffloadModelForCausalLM,
    FlexOffloadLlamaForCausalLM,
    FlexOffloadOPTForCausalLM,
    Policy,
    Split,
)
from hf_flexoffload.architectures import ARCHITECTURES
from hf_flexoffload.modeling.auto import MODEL_CLASSES


def test_every_architecture_has_a_model_class():
    assert set(MODEL_CLASSES) == set(ARCHITECTURES)
    for model_type, cls in MODEL_CLASSES.items():
        assert cls.supported_model_type == model_type


@pytest.mark.parametrize(
    "fixture, cls",
    [
        ("pre_ln_checkpoint", FlexOffloadOPTForCausalLM),
        ("gqa_checkpoint", FlexOffloadLlamaForCausalLM),
    ],
    ids=["opt", "llama"],
)
def test_dispatches_on_model_type(request, fixture, cls):
    path, _ = request.getfixturevalue(fixture)
    policy = Policy(weights=Split(host=0.5, disk=0.5))
    with AutoFlexOffloadModelForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        assert type(model) is cls
        assert model.offload_policy == policy


def test_unsupported_model_type_fails_before_loading(tmp_path):
    GPT2Config().save_pretrained(tmp_path)  # a config alone: nothing else may be read
    with pytest.raises(ValueError, match=r"'gpt2' model.*supported model types: 'opt', 'llama'"):
        AutoFlexOffloadModelForCausalLM.from_pretrained(tmp_path, offload_policy=Policy())


def test_missing_directory_and_wrong_class(tmp_path, pre_ln_checkpoint):
    with pytest.raises(FileNotFoundError, match="is not a directory: no checkpoint there"):
        AutoFlexOffloadModelForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="AutoFlexOffloadModelForCausalLM picks"):
        FlexOffloadLlamaForCausalLM.from_pretrained(pre_ln_checkpoint[0], offload_policy=Policy())
    with pytest.raises(OSError, match="from_pretrained"):
        AutoFlexOffloadModelForCausalLM()
