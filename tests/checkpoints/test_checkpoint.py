"""Checkpoints as users have them (safetensors or PyTorch ``.bin``, single or sharded) load and
generate stock tokens; bad checkpoints and load arguments fail before any heavy work, saying
what to do."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

from hf_flexoffload import (
    AutoFlexOffloadModelForCausalLM,
    FlexOffloadOPTForCausalLM,
    Policy,
    QuantConfig,
    Split,
)
from hf_flexoffload.checkpoints.checkpoint import (
    SafetensorsCheckpoint,
    TorchCheckpoint,
    open_checkpoint,
)

from ..conftest import (
    batch,
    build_llama,
    build_model,
    save_torch_bin,
    tiny_config,
    tiny_llama_config,
)

# (model, shards): OPT and both Llama head layouts, sharded with an index and as one file.
BIN_MODELS = {
    "opt_2_shards": (lambda: build_model(tiny_config("pre_ln")), 2),
    "llama_gqa_tied_3_shards": (lambda: build_llama(tiny_llama_config(2, True)), 3),
    "llama_untied_single_file": (lambda: build_llama(tiny_llama_config(4, False)), 1),
}
BIN_PLACEMENTS = {
    "all_in_memory": Policy(),
    "weights_mixed": Policy(weights=Split(device=0.2, host=0.5, disk=0.3)),
    "weights_disk_direct_io_micro_batches": Policy(
        micro_batch_size=2, num_micro_batches=2, weights=Split(disk=1.0), direct_io=True
    ),
}


@pytest.fixture(scope="module", params=list(BIN_MODELS), ids=list(BIN_MODELS))
def bin_checkpoint(request, tmp_path_factory):
    """(path, stock model loaded by transformers from the same ``.bin`` files)."""
    build, shards = BIN_MODELS[request.param]
    path = tmp_path_factory.mktemp(f"bin-{request.param}")
    save_torch_bin(build(), path, shards)
    return str(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.compat
@pytest.mark.parametrize("policy", list(BIN_PLACEMENTS.values()), ids=list(BIN_PLACEMENTS))
def test_torch_bin_checkpoint_generates_stock_tokens(bin_checkpoint, policy, tmp_path):
    path, stock = bin_checkpoint
    assert not any(name.endswith(".safetensors") for name in os.listdir(path))
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        path, offload_policy=policy, offload_dir=tmp_path
    ) as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        report = model.placement_report
    assert torch.equal(got, expected)
    assert report.in_place_bytes == 0  # .bin archives are not raw bytes: disk rows are copied


def test_checkpoint_format_preference(tmp_path):
    model = build_model(tiny_config("pre_ln"))
    model.save_pretrained(tmp_path)
    save_torch_bin(model, tmp_path, shards=2)
    assert isinstance(open_checkpoint(str(tmp_path)), SafetensorsCheckpoint)
    assert isinstance(open_checkpoint(str(tmp_path), use_safetensors=True), SafetensorsCheckpoint)
    both = open_checkpoint(str(tmp_path), use_safetensors=False)
    assert isinstance(both, TorchCheckpoint)
    name = "decoder.layers.1.fc1.weight"
    rows = both.read_rows(name, 3, 9, torch.empty(6, 64))
    assert torch.equal(rows, model.state_dict()["model." + name][3:9])
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"use_safetensors=True"):
        open_checkpoint(str(tmp_path), use_safetensors=True)


class _NotATensor:
    pass


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    tiny_config("pre_ln").save_pretrained(tmp_path)
    torch.save(
        {"decoder.embed_tokens.weight": torch.zeros(2, 2), "x": _NotATensor()},
        tmp_path / "pytorch_model.bin",
    )
    with pytest.raises(ValueError, match="never unpickles arbitrary objects"):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path, offload_policy=Policy())


def test_index_naming_a_missing_shard(tmp_path):
    save_torch_bin(build_model(tiny_config("pre_ln")), tmp_path, shards=2)
    os.remove(tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model-00002-of-00002\.bin"):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path, offload_policy=Policy())


def test_not_opt(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' model.*supports model_type 'opt'"):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path, offload_policy=Policy())


def test_hub_id_not_in_the_offline_cache():
    # conftest keeps the tests offline, with an empty hub cache.
    with pytest.raises(FileNotFoundError, match=r"facebook/opt-125m"):
        FlexOffloadOPTForCausalLM.from_pretrained("facebook/opt-125m")


def test_no_weights(pre_ln_checkpoint, tmp_path):
    path, _ = pre_ln_checkpoint
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path, offload_policy=Policy())


def test_missing_tensor_is_named(pre_ln_checkpoint, tmp_path):
    path, _ = pre_ln_checkpoint
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.decoder.layers.1.fc1.weight"]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    offload = tmp_path / "offload"
    with pytest.raises(ValueError, match=r"missing decoder\.layers\.1\.fc1\.weight"):
        FlexOffloadOPTForCausalLM.from_pretrained(
            tmp_path, offload_policy=Policy(weights=Split(disk=1.0)), offload_dir=offload
        )
    assert not offload.exists(), "nothing is written before the checks pass"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(device_map="auto"), ValueError, "device_map is not supported"),
        (dict(subfolder="x"), TypeError, "unsupported arguments.*subfolder"),
        (dict(offload_policy=42), ValueError, "Invalid offload_policy"),
        (dict(max_memory={"gpu": "1GiB"}), ValueError, "max_memory keys"),
        (dict(max_memory={"device": "lots"}), ValueError, "Invalid max_memory"),
    ],
    ids=["device_map", "unknown_kwarg", "bad_policy", "bad_tier", "bad_size"],
)
def test_bad_arguments(pre_ln_checkpoint, kwargs, error, message):
    path, _ = pre_ln_checkpoint
    kwargs.setdefault("offload_policy", Policy())
    with pytest.raises(error, match=message):
        FlexOffloadOPTForCausalLM.from_pretrained(path, **kwargs)


def test_policy_that_cannot_fit_names_each_tier(pre_ln_checkpoint, tmp_path):
    path, _ = pre_ln_checkpoint
    # bf16 weights from an fp32 checkpoint must be written to the disk tier: no room for them.
    with pytest.raises(MemoryError, match=r"(?s)too much on disk.*disk +needs.*has +10B"):
        FlexOffloadOPTForCausalLM.from_pretrained(
            path,
            offload_policy=Policy(weights=Split(disk=1.0)),
            dtype=torch.bfloat16,
            max_memory={"disk": 10},
            offload_dir=tmp_path / "off",
        )
    assert not (tmp_path / "off").exists()


def test_unwritable_offload_dir(pre_ln_checkpoint, tmp_path):
    path, _ = pre_ln_checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        FlexOffloadOPTForCausalLM.from_pretrained(
            path, offload_policy=Policy(weights=Split(disk=1.0)), offload_dir=blocker / "sub"
        )


def test_batch_that_cannot_fit(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    policy = Policy(cache=Split(device=1.0))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, max_memory={"device": "2MB"}
    ) as model:
        ids = torch.randint(3, 90, (64, 40))
        too_big = r"A batch of 64 sequences of 40 \+ 20 tokens(.|\n)*kv cache"
        with pytest.raises(MemoryError, match=too_big):
            model.generate(ids, max_new_tokens=20)
        model.generate(ids[:2, :5], max_new_tokens=2)  # a small batch still works


def _disk_files(directory):
    """Each weight file under ``directory`` (in its model's directory) -> modification time."""
    return {
        f: os.stat(f).st_mtime_ns
        for f in glob.glob(os.path.join(directory, "weights", "*", "*"))
        if f.endswith(".bin")
    }


def _indexes(directory) -> list[str]:
    return glob.glob(os.path.join(directory, "weights", "*", "index.json"))


def test_offload_files_reused_and_interrupted_load_not_trusted(
    pre_ln_checkpoint, tmp_path, monkeypatch
):
    # bf16 from the fp32 checkpoint: the disk tier holds converted copies (not read in place).
    path, _ = pre_ln_checkpoint
    offload = str(tmp_path / "off")
    policy = Policy(weights=Split(host=0.5, disk=0.5))
    ids = torch.randint(3, 90, (2, 5))
    load = functools.partial(
        FlexOffloadOPTForCausalLM.from_pretrained, path, dtype=torch.bfloat16, offload_dir=offload
    )

    with load(offload_policy=policy) as m:
        expected = m.generate(ids, max_new_tokens=4, do_sample=False)
    first = _disk_files(offload)
    assert first and len(_indexes(offload)) == 1

    # Same checkpoint and policy: the files are adopted, not rewritten.
    with load(offload_policy=policy) as m:
        assert torch.equal(m.generate(ids, max_new_tokens=4, do_sample=False), expected)
    assert _disk_files(offload) == first

    # A load with another placement is interrupted half way.
    from hf_flexoffload.storage import tier_store

    real_put, calls = tier_store.TierStore.put_chunks, []

    def flaky_put(self, key, *args):
        calls.append(key)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_put(self, key, *args)

    monkeypatch.setattr(tier_store.TierStore, "put_chunks", flaky_put)
    with pytest.raises(KeyboardInterrupt):
        load(offload_policy=Policy(weights=Split(disk=1.0)))
    monkeypatch.undo()
    assert len(_indexes(offload)) == 1, "the interrupted load wrote no index of its own"

    # Corrupt one file too; the next load does not trust it and still gives the right tokens.
    victim = next(f for f in first if f.endswith(".bin"))
    with open(victim, "r+b") as f:
        f.truncate(3)
    with load(offload_policy=policy) as m:
        assert torch.equal(m.generate(ids, max_new_tokens=4, do_sample=False), expected)
    (index,) = _indexes(offload)  # the interrupted load's files were removed as unused
    with open(index) as f:
        assert json.load(f)["fingerprint"]["weights"] == [0.0, 0.5, 0.5]


def test_temporary_offload_dir_removed_on_close(pre_ln_checkpoint):
    path, _ = pre_ln_checkpoint
    model = FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=Policy(weights=Split(disk=1.0), cache=Split(disk=1.0))
    )
    directory = model.engine.offload_dir
    model.generate(torch.randint(3, 90, (2, 4)), max_new_tokens=2)
    assert os.path.isdir(directory)
    model.close()
    assert not os.path.exists(directory)
    with pytest.raises(RuntimeError, match="closed"):
        model.generate(torch.randint(3, 90, (2, 4)), max_new_tokens=2)


# -- compressed checkpoints --------------------------------------------------------------------


def test_save_compressed_then_load_skips_quantization(pre_ln_checkpoint, tmp_path, monkeypatch):
    from hf_flexoffload.checkpoints import checkpoint_store

    path, _ = pre_ln_checkpoint
    policy = Policy(compress_weights=QuantConfig(bits=4, group_size=32), weights=Split(disk=1.0))
    ids = torch.randint(3, 90, (3, 6))
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        model.save_compressed(tmp_path / "q")
        with pytest.raises(FileExistsError, match="already holds a checkpoint"):
            model.save_compressed(tmp_path / "q")
        report = model.placement_report
    saved = os.path.getsize(tmp_path / "q" / "model.safetensors")
    assert report.total_bytes < saved < report.total_bytes + 64 * 1024  # bytes + header

    def no_quantize(*args, **kwargs):
        raise AssertionError("a compressed checkpoint must not be quantized again")

    monkeypatch.setattr(checkpoint_store, "quantize_rows_to_bytes", no_quantize)
    other = Policy(
        # the same, spelled out: input-channel groups, searched rounding
        compress_weights=QuantConfig(bits=4, group_size=32, dim=-1, rounding="search"),
        weights=Split(device=0.3, host=0.3, disk=0.4),
        micro_batch_size=2,
    )
    for again in (other, "auto"):
        with FlexOffloadOPTForCausalLM.from_pretrained(
            tmp_path / "q", offload_policy=again
        ) as model:
            assert model.offload_policy.compress_weights.group_size == 32
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(offload_policy=Policy()), "holds weights compressed with"),
        (
            dict(offload_policy=Policy(compress_weights=QuantConfig(bits=8, group_size=32))),
            "bits=8",
        ),
        (
            dict(
                offload_policy=Policy(
                    compress_weights=QuantConfig(group_size=32), compress_embeddings=True
                )
            ),
            "compress_embeddings=True",
        ),
        (
            dict(offload_policy=Policy(compress_weights=QuantConfig(group_size=32, dim=0))),
            "dim=0",
        ),
        (
            dict(
                offload_policy=Policy(
                    compress_weights=QuantConfig(group_size=32, rounding="minmax")
                )
            ),
            "rounding='minmax'",
        ),
        (
            dict(
                offload_policy=Policy(compress_weights=QuantConfig(group_size=32)), dtype="bfloat16"
            ),
            "compressed checkpoint for dtype torch.float32",
        ),
    ],
    ids=[
        "uncompressed_policy",
        "other_bits",
        "other_embeddings",
        "output_channel_groups",
        "other_rounding",
        "other_dtype",
    ],
)
def test_compressed_checkpoint_with_other_settings_is_an_error(
    pre_ln_checkpoint, tmp_path, kwargs, message
):

    path, _ = pre_ln_checkpoint
    policy = Policy(compress_weights=QuantConfig(group_size=32))
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.save_compressed(tmp_path / "q")
    offload = tmp_path / "off"
    with pytest.raises(ValueError, match=message):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path / "q", offload_dir=offload, **kwargs)
    assert not offload.exists()


def test_version_1_compressed_checkpoint_is_refused(pre_ln_checkpoint, tmp_path):
    """Version 1 wrote dim=None for groups along the output channels; read with today's
    meaning (input channels) its bytes would be garbage, so it is refused by name."""
    path, _ = pre_ln_checkpoint
    policy = Policy(compress_weights=QuantConfig())
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        model.save_compressed(tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    data = file.read_bytes()
    assert data.count(b'"version":"2"') == 1
    file.write_bytes(data.replace(b'"version":"2"', b'"version":"1"'))  # same header length
    with pytest.raises(
        ValueError, match=r"format version '1'; this hf_flexoffload reads version 2"
    ):
        FlexOffloadOPTForCausalLM.from_pretrained(tmp_path / "q", offload_policy=policy)


def test_save_compressed_needs_compressed_weights(pre_ln_checkpoint, tmp_path):
    path, _ = pre_ln_checkpoint
    model = FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=Policy())
    with model, pytest.raises(ValueError, match="not compressed"):
        model.save_compressed(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_compressed_disk_files_reused(pre_ln_checkpoint, tmp_path):

    path, _ = pre_ln_checkpoint
    offload = str(tmp_path / "off")
    policy = Policy(compress_weights=QuantConfig(group_size=32), weights=Split(disk=1.0))
    FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, offload_dir=offload
    ).close()
    first = _disk_files(offload)
    FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, offload_dir=offload
    ).close()
    assert _disk_files(offload) == first
    # Another compression must not adopt them.
    other = Policy(compress_weights=QuantConfig(group_size=16), weights=Split(disk=1.0))
    FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=other, offload_dir=offload
    ).close()
    assert _disk_files(offload) != first
