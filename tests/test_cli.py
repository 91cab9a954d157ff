from __future__ import annotations

import pytest

from hf_flexoffload import cli


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
    code = cli.main(
        [
            "demo",
            "--batch-size",
            "4",
            "--prompt-len",
            "8",
            "--new-tokens",
            "3",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Same tokens as transformers: yes" in out
    assert "disk" in out and "tok/s" in out
    # The checkpoint is built once and reused.
    assert (
        cli.main(
            [
                "demo",
                "--batch-size",
                "4",
                "--prompt-len",
                "8",
                "--new-tokens",
                "2",
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 0
    )


def test_demo_rejects_tiny_batch():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--batch-size", "1"])
