"""resolve_pretrained against a Hub cache laid out by hand in tmp_path: no network, ever."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import huggingface_hub
import huggingface_hub.constants  # a lazy attribute of the package until imported
import pytest

from hf_flexoffload.checkpoints.hub import PYTORCH_WEIGHTS, SAFETENSORS_WEIGHTS, resolve_pretrained

REPO = "org/name"
MAIN = "a" * 40
V1 = "b" * 40
CONFIG = {"config.json": b"{}"}
INDEX = json.dumps(
    {
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        }
    }
).encode()


def make_repo(
    cache,
    files: dict[str, bytes],
    *,
    commit: str = MAIN,
    ref: str | None = "main",
    absent: tuple[str, ...] = (),
    symlinks: bool = True,
    repo_id: str = REPO,
) -> str:
    """Lay out one revision of ``repo_id`` as huggingface_hub caches it; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = snapshot / name
        if symlinks:
            # Content-addressed blobs; the snapshot entry is a relative symlink, as the hub makes.
            sha = hashlib.sha256(data).hexdigest()
            (repo / "blobs").mkdir(exist_ok=True)
            (repo / "blobs" / sha).write_bytes(data)
            target.symlink_to(os.path.join("..", "..", "blobs", sha))
        else:
            target.write_bytes(data)
    for name in absent:
        marker = repo / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline: the hub reads the file verbatim
    return str(snapshot)


@pytest.fixture
def cache(tmp_path):
    # hf_hub_download resolves cache_dir, so compare against the resolved path.
    return tmp_path.resolve() / "hub"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline mode as HF_HUB_OFFLINE=1 sets it, plus a guard failing any attempt to connect."""
    # hf_hub_download consults `constants.HF_HUB_OFFLINE` (through `constants.is_offline_mode()`
    # where it exists) at call time, so patching the constant is enough.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture
def requested(monkeypatch):
    """The file names passed to hf_hub_download, in order."""
    names: list[str] = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        names.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return names


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlike"])
def test_local_directory_returned_as_is(tmp_path, as_path, requested):
    (tmp_path / "config.json").write_text("{}")
    arg = tmp_path if as_path else str(tmp_path)
    assert resolve_pretrained(arg, revision="nope", local_files_only=True) == str(tmp_path)
    assert requested == []


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlinks", "plain-files"])
def test_repo_id_resolves_to_snapshot(cache, symlinks):
    files = {**CONFIG, "generation_config.json": b"{}", "model.safetensors": b"w"}
    snapshot = make_repo(cache, files, symlinks=symlinks)
    assert resolve_pretrained(REPO, cache_dir=cache) == snapshot


@pytest.mark.parametrize("revision", ["v1", V1], ids=["tag", "commit-hash"])
def test_revision(cache, revision):
    make_repo(cache, {**CONFIG, "model.safetensors": b"main"})
    v1 = make_repo(cache, {**CONFIG, "model.safetensors": b"v1"}, commit=V1, ref="v1")
    assert resolve_pretrained(REPO, revision=revision, cache_dir=cache) == v1


@pytest.mark.parametrize(
    ("use_safetensors", "chosen", "never"),
    [
        (None, "model.safetensors", "pytorch_model.bin"),
        (True, "model.safetensors", "pytorch_model.bin"),
        (False, "pytorch_model.bin", "model.safetensors"),
    ],
    ids=["default-prefers-safetensors", "safetensors-only", "bin-only"],
)
def test_weights_form(cache, requested, use_safetensors, chosen, never):
    make_repo(
        cache,
        {**CONFIG, "model.safetensors": b"s", "pytorch_model.bin": b"b"},
        absent=("model.safetensors.index.json", "pytorch_model.bin.index.json"),
    )
    resolve_pretrained(REPO, cache_dir=cache, use_safetensors=use_safetensors)
    assert chosen in requested
    assert never not in requested  # only what is needed is fetched


def test_sharded_index_fetches_every_shard(cache, requested):
    shards = {"model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2"}
    snapshot = make_repo(cache, {**CONFIG, "model.safetensors.index.json": INDEX, **shards})
    assert resolve_pretrained(REPO, cache_dir=cache) == snapshot
    assert set(shards) <= set(requested)
    assert not set(requested) & {"model.safetensors", *PYTORCH_WEIGHTS}


def test_tokenizer_files(cache, requested):
    tokenizer = {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "merges.txt": b""}
    snapshot = make_repo(
        cache,
        {**CONFIG, "model.safetensors": b"w", **tokenizer},
        # Known absent; chat_template.jinja & co. are neither cached nor marked: skipped too.
        absent=("vocab.json", "tokenizer.model", "generation_config.json"),
    )
    assert resolve_pretrained(REPO, cache_dir=cache, tokenizer=True) == snapshot
    assert set(tokenizer) <= set(requested)
    # A commit's `.no_exist` marker is final: no lookup at all; an unmarked file is still tried.
    assert "vocab.json" not in requested
    assert "chat_template.jinja" in requested
    assert not os.path.exists(os.path.join(snapshot, "chat_template.jinja"))


def test_local_files_only(cache, monkeypatch):
    # The offline switch off: local_files_only alone must keep everything local (the autouse
    # fixture fails the test on any connection attempt).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snapshot = make_repo(cache, {**CONFIG, "pytorch_model.bin": b"b"}, absent=SAFETENSORS_WEIGHTS)
    assert resolve_pretrained(REPO, cache_dir=cache, local_files_only=True) == snapshot
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        resolve_pretrained("org/unknown", cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize(
    "local_files_only", [False, True], ids=["HF_HUB_OFFLINE", "local_files_only"]
)
def test_unknown_repo_offline(cache, local_files_only):
    cache.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        resolve_pretrained("org/unknown", cache_dir=cache, local_files_only=local_files_only)
    message = str(info.value)
    assert "'org/unknown'" in message
    assert "revision main" in message
    assert str(cache) in message
    assert "hf download org/unknown" in message
    assert "local checkpoint directory" in message


def test_invalid_repo_id():
    with pytest.raises(
        FileNotFoundError, match="neither a local checkpoint directory nor a Hugging"
    ):
        resolve_pretrained("not a repo id!")


@pytest.mark.parametrize(
    "name",
    ["a/b/c/d", "./models/opt", "/no/such/checkpoint", "~/opt-125m", "{existing}/typo"],
    ids=["three_slashes", "relative", "absolute", "home", "under_an_existing_dir"],
)
def test_a_mistyped_path_is_refused_at_once_without_the_hub(name, tmp_path, monkeypatch):
    """A name only a path can be never reaches the hub (whose retries take ~30 s offline)."""
    from hf_flexoffload.checkpoints import hub

    monkeypatch.setattr(hub, "_fetch", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a directory: no checkpoint there"):
        resolve_pretrained(name.format(existing="existing"))


@pytest.mark.parametrize(
    ("use_safetensors", "names", "restricted"),
    [
        (None, SAFETENSORS_WEIGHTS + PYTORCH_WEIGHTS, False),
        (True, SAFETENSORS_WEIGHTS, True),
    ],
    ids=["any-form", "safetensors-only"],
)
def test_no_weights(cache, use_safetensors, names, restricted):
    make_repo(cache, CONFIG, absent=SAFETENSORS_WEIGHTS + PYTORCH_WEIGHTS)
    with pytest.raises(FileNotFoundError, match="no weights file") as info:
        resolve_pretrained(REPO, cache_dir=cache, use_safetensors=use_safetensors)
    assert all(name in str(info.value) for name in names)
    assert ("use_safetensors=True restricted" in str(info.value)) == restricted


def test_weights_not_cached_offline(cache):
    # No `.no_exist` markers: the repo may have weights, they are just not downloaded.
    make_repo(cache, CONFIG)
    with pytest.raises(FileNotFoundError, match="are in the local cache") as info:
        resolve_pretrained(REPO, cache_dir=cache)
    assert "HF_HUB_OFFLINE=1" in str(info.value)
    assert "hf download org/name" in str(info.value)


def test_missing_shard(cache):
    make_repo(
        cache,
        {**CONFIG, "model.safetensors.index.json": INDEX, "model-00001-of-00002.safetensors": b"1"},
    )
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        resolve_pretrained(REPO, cache_dir=cache)


def test_env_offline_subprocess(cache):
    snapshot = make_repo(cache, {**CONFIG, "model.safetensors": b"w"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    code = (
        "from hf_flexoffload.checkpoints.hub import resolve_pretrained; "
        "print(resolve_pretrained('org/name'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == snapshot


# -- end to end: a hub id loads and generates stock tokens ------------------------------------


def _repo_files(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in os.listdir(directory)}


@pytest.mark.compat
@pytest.mark.parametrize(
    "form, model",
    [
        ("safetensors", "opt-pre_ln"),
        ("bin", "opt-pre_ln"),
        ("safetensors", "qwen2-window"),
        ("bin", "gpt_neox-parallel"),
    ],
    ids=["safetensors", "torch_bin", "qwen2_safetensors", "gpt_neox_torch_bin"],
)
def test_hub_id_generates_stock_tokens(tmp_path, cache, monkeypatch, form, model):
    import torch

    from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Split

    from ..conftest import batch, build_by_id, save_torch_bin

    # The families in fp32: bf16 attention kernels round differently from stock's (see
    # tests/architectures/test_families.py), which these random models' greedy ties show.
    stock = build_by_id(model).to(torch.bfloat16 if model.startswith("opt") else torch.float32)
    saved = tmp_path / "saved"
    if form == "bin":
        save_torch_bin(stock, saved, shards=2)
    else:
        stock.save_pretrained(saved)
    snapshot = make_repo(cache, _repo_files(saved))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ids, mask = batch()
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    policy = Policy(weights=Split(host=0.3, disk=0.7))
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        REPO, revision="main", offload_policy=policy, offload_dir=tmp_path / "off"
    ) as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        report = model.placement_report
    assert torch.equal(got, expected)
    disk = report.bytes_per_tier["disk"]
    # safetensors: the disk tier is the cached blobs themselves; .bin rows are copied.
    assert report.in_place_bytes == (disk if form == "safetensors" else 0)
    written = sum(f.stat().st_size for f in (tmp_path / "off" / "weights").glob("*/*.bin"))
    assert written == disk - report.in_place_bytes
    assert os.path.isdir(snapshot)


def test_cli_names_a_hub_id_missing_from_the_cache(cache, monkeypatch, capsys):
    from hf_flexoffload.cli import EXIT_USAGE, main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert main(["plan", "--model", "org/absent", "--revision", "v2"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'org/absent' (revision v2)" in err and "hf download org/absent --revision v2" in err
