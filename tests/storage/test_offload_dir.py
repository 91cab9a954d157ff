"""Offload files belong to one model: a second model in the same ``offload_dir`` gets its own
files, a model in use keeps its files, concurrent loads of one model wait for each other, and a
changed file is noticed before it is used."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.config.counters import Counters
from hf_flexoffload.storage.offload_dir import ModelDirectory, model_key
from hf_flexoffload.storage.tier_store import CheckpointChangedError, TierStore

from ..conftest import batch, build_model, tiny_config

ALL_ON_DISK = Policy(weights=Split(disk=1.0))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two OPT checkpoints of the same shape and sizes, different seeds."""
    out = []
    for seed in (0, 1):
        model = build_model(tiny_config("pre_ln"), seed=seed)
        path = tmp_path_factory.mktemp(f"opt-seed{seed}")
        model.save_pretrained(path)
        out.append((str(path), model.to(torch.bfloat16)))
    return out


def _load(path, offload, policy=ALL_ON_DISK):
    # bf16 compute on fp32 checkpoints: the disk tier holds converted copies written to offload
    return FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, dtype=torch.bfloat16, offload_dir=offload
    )


def _generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


def test_two_models_in_one_offload_dir_keep_their_own_weights(two_checkpoints, tmp_path):
    (path_a, stock_a), (path_b, stock_b) = two_checkpoints
    ids, mask = batch()
    want_a, want_b = _generate(stock_a, ids, mask), _generate(stock_b, ids, mask)
    assert not torch.equal(want_a, want_b)
    offload = str(tmp_path / "off")
    with _load(path_a, offload) as a, _load(path_b, offload) as b:
        assert a.placement_report.in_place_bytes == 0  # converted copies were written
        assert torch.equal(_generate(b, ids, mask), want_b)
        assert torch.equal(_generate(a, ids, mask), want_a)
        assert a.engine.store.directory != b.engine.store.directory
    # Both closed: the next load of another model removes the files no one uses.
    with _load(path_a, offload) as a:
        assert torch.equal(_generate(a, ids, mask), want_a)
        assert os.listdir(os.path.join(offload, "weights")) == [
            os.path.basename(a.engine.store.directory)
        ]


def test_offload_file_overwritten_with_same_size_is_not_reused(two_checkpoints, tmp_path):
    (path_a, stock_a), _ = two_checkpoints
    ids, mask = batch()
    offload = str(tmp_path / "off")
    with _load(path_a, offload) as a:
        directory = a.engine.store.directory
    files = sorted(f for f in os.listdir(directory) if f.endswith(".bin"))
    victim = os.path.join(directory, files[len(files) // 2])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:  # other bytes, same size
        f.write(os.urandom(size))
    with _load(path_a, offload) as a:
        assert torch.equal(_generate(a, ids, mask), _generate(stock_a, ids, mask))


def test_offload_file_changed_after_load_is_refused(two_checkpoints, tmp_path):
    (path_a, _), _ = two_checkpoints
    ids, mask = batch()
    with _load(path_a, str(tmp_path / "off")) as a:
        directory = a.engine.store.directory
        victim = next(os.path.join(directory, f) for f in os.listdir(directory) if ".bin" in f)
        tmp = victim + ".new"
        with open(victim, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, victim)  # another file at the same path
        with pytest.raises(CheckpointChangedError, match="offload file"):
            _generate(a, ids, mask)


def test_model_in_use_is_not_pruned_and_concurrent_loads_wait(tmp_path):
    root = str(tmp_path / "weights")
    first = ModelDirectory(root, {"model": 1})
    other = ModelDirectory(root, {"model": 2})
    other.prune_others()
    assert os.path.isdir(first.path), "a directory held in use is never removed"
    first.close()
    other.prune_others()
    assert not os.path.exists(first.path)
    assert other.path.endswith(model_key({"model": 2}))

    # A second loader of the same model waits until the first has written its files.
    events = []
    again = ModelDirectory(root, {"model": 2})

    def second():
        with again.loading():
            events.append("second")

    with other.loading():
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.3)
        events.append("first done")
    thread.join()
    assert events == ["first done", "second"]
    other.close()
    again.close()


def test_store_adopts_only_files_with_the_recorded_digest(tmp_path):
    store = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    store.open_index({"v": 1})
    store.put("w", torch.arange(12.0).reshape(3, 4), "disk")
    store.write_index({"v": 1})
    store.release()
    with open(tmp_path / "w.bin", "r+b") as f:
        f.write(b"\x7f" * 8)  # same size, other bytes
    again = TierStore(torch.device("cpu"), str(tmp_path), Counters())
    again.open_index({"v": 1})
    assert not again.adopt("w", (3, 4), torch.float32)
