from __future__ import annotations

import os

import pytest

from hf_flexoffload import cli


def run_demo(cache_dir, new_tokens: int) -> int:
    args = f"demo --batch-size 4 --prompt-len 8 --new-tokens {new_tokens} --cache-dir {cache_dir}"
    return cli.main(args.split())


def test_demo_runs_and_reports(tmp_path, monkeypatch, capsys):
    tiny = dict(
        cli.OPT_125M,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=512,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    monkeypatch.setattr(cli, "OPT_125M", tiny)
    assert run_demo(tmp_path, 3) == 0
    out = capsys.readouterr().out
    assert "Same tokens as transformers: yes" in out
    assert "disk" in out and "tok/s" in out
    checkpoint = tmp_path / "demo-opt-125m-bf16" / "model.safetensors"
    built = os.stat(checkpoint).st_mtime_ns
    assert run_demo(tmp_path, 2) == 0
    assert os.stat(checkpoint).st_mtime_ns == built, "the checkpoint is built once and reused"


def test_demo_rejects_tiny_batch():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--batch-size", "1"])
