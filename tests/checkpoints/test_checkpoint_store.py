"""The checkpoint is the disk tier: disk rows in the checkpoint's own form are read in place
from its files (nothing written to offload_dir), with the same tokens as stock transformers."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.storage.disk_file import DiskFile, direct_io_supported
from hf_flexoffload.storage.tier_store import CheckpointChangedError

from ..conftest import batch, build_model, tiny_config

PLACEMENTS = {
    "weights_disk": Policy(weights=Split(disk=1.0)),
    "weights_mixed_direct_io": Policy(
        weights=Split(device=0.2, host=0.3, disk=0.5), direct_io=True
    ),
    "everything_offloaded_overlap": Policy(
        micro_batch_size=2,
        num_micro_batches=2,
        weights=Split(host=0.2, disk=0.8),
        cache=Split(host=0.5, disk=0.5),
        overlap=True,
        direct_io=True,
    ),
}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A bf16 checkpoint in two safetensors shards, and the stock bf16 model."""
    model = build_model(tiny_config("pre_ln"), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("opt-bf16")
    model.save_pretrained(path, max_shard_size="40KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    return str(path), model


def _written(offload_dir) -> int:
    files = glob.glob(os.path.join(offload_dir, "weights", "*", "*.bin"))
    return sum(os.path.getsize(f) for f in files)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_compute"])
@pytest.mark.parametrize("policy", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_disk_tier_read_in_place_matches_stock(bf16_checkpoint, tmp_path, policy, dtype):
    path, stock = bf16_checkpoint
    stock = stock if dtype == torch.bfloat16 else stock.to(dtype)  # as from_pretrained(dtype=)
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, dtype=dtype, offload_dir=tmp_path
    ) as model:
        report = model.placement_report
        assert report.in_place_bytes == report.bytes_per_tier["disk"] > 0
        assert _written(tmp_path) == 0
        assert "read in place from the checkpoint" in str(report)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert not glob.glob(os.path.join(tmp_path, "weights", "*", "index.json"))


def test_only_what_changes_form_is_written(bf16_checkpoint, tmp_path):
    # fp32 checkpoint computed in bf16: every disk row is converted, so all of it is written.
    path, _ = bf16_checkpoint
    fp32 = tmp_path / "fp32"
    build_model(tiny_config("pre_ln")).save_pretrained(fp32)
    policy = Policy(weights=Split(host=0.5, disk=0.5))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        fp32, offload_policy=policy, dtype=torch.bfloat16, offload_dir=tmp_path / "off"
    ) as model:
        assert model.placement_report.in_place_bytes == 0
        assert _written(tmp_path / "off") == model.placement_report.bytes_per_tier["disk"]
    # The same directory used for the bf16 checkpoint read in place: the stale copies go.
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, offload_dir=tmp_path / "off"
    ):
        assert _written(tmp_path / "off") == 0


def test_checkpoint_changed_under_a_loaded_model(bf16_checkpoint, tmp_path):
    path, _ = bf16_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    ids = torch.randint(3, 90, (2, 5))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        copy, offload_policy=Policy(weights=Split(disk=1.0)), offload_dir=tmp_path / "off"
    ) as model:
        model.generate(ids, max_new_tokens=2)
        shard = next(copy.glob("model-00001-*.safetensors"))
        shutil.copy(shard, tmp_path / "new")
        os.replace(tmp_path / "new", shard)  # same bytes, but another file: not trusted
        with pytest.raises(CheckpointChangedError, match="Load the model again"):
            model.generate(ids, max_new_tokens=2)
        with pytest.raises(CheckpointChangedError):
            model(input_ids=ids)


def test_direct_reads_in_place_land_in_the_staging_buffers(tmp_path, monkeypatch):
    # Checkpoint offsets are not block-aligned; staging buffers are placed at the same page
    # phase as each tensor's file offset, so only the edges of a read go through the bounce.
    if not direct_io_supported(str(tmp_path)):
        pytest.skip("the test directory's filesystem has no O_DIRECT")
    config = tiny_config("pre_ln", hidden_size=256, ffn_dim=1024, word_embed_proj_dim=256)
    build_model(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    bounced = []
    real = DiskFile._read_bounced
    monkeypatch.setattr(
        DiskFile, "_read_bounced", lambda self, o, v: bounced.append(len(v)) or real(self, o, v)
    )
    policy = Policy(weights=Split(disk=1.0), direct_io=True)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        tmp_path / "ckpt", offload_policy=policy, offload_dir=tmp_path / "off"
    ) as model:
        bounced.clear()
        model.generate(torch.randint(3, 90, (2, 5)), max_new_tokens=3)
        moved = model.generation_stats.bytes_moved["disk_to_host"]
    assert 0 < sum(bounced) < 0.1 * moved
