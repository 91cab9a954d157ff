"""The beyond-RAM benchmark runs end to end on a tiny shape (its numbers are not checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from .conftest import seed_profile

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def beyond_ram(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    slow = {1: 1e9, 16: 5e9, 256: 10e9}
    for dtype, scale in ((torch.float32, 1), (torch.bfloat16, 20)):  # bf16 faster: all run it
        rates = {rows: scale * rate for rows, rate in slow.items()}
        seed_profile(tmp_path / "cache", tmp_path / "work", (64, 256), dtype, matmul_flops=rates)
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS))  # the spawned runs import the scripts
    import beyond_ram

    yield beyond_ram
    for name in ("beyond_ram", "checkpoints", "side_by_side", "_beyond_ram_report", "_common"):
        sys.modules.pop(name, None)


def test_runs_ours_and_accelerate_and_writes_the_table(beyond_ram, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# B\n\n<!-- benchmark:beyond-ram:start -->\nOLD\n<!-- benchmark:beyond-ram:end -->\nend\n"
    )
    results = beyond_ram.main(
        [
            "--model=opt-tiny",
            "--budget=512MiB",
            "--working-memory=256MiB",
            "--prompt-len=8",
            "--gen-len=3",
            f"--checkpoint-dir={tmp_path / 'ckpt'}",
            f"--work-dir={tmp_path / 'work'}",
            f"--doc={doc}",
            f"--plot={tmp_path / 'beyond_ram.png'}",
        ]
    )
    by_system = {r["system"]: r for r in results}
    assert set(by_system) == {"ours, auto", "ours, fixed", "accelerate"}
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["batch"] == 2 and len(r["first_tokens"]) == 2
        assert r["dtype"] == "bfloat16", r  # --dtype auto: each system at its fastest
    fixed = by_system["ours, fixed"]
    assert fixed["weights_read_per_step"] > 0 and fixed["policy"]["direct_io"]
    assert fixed["roofline"] > 0 and by_system["ours, auto"]["roofline"] > 0
    # Same prompts, same dtype, greedy: the first tokens agree row by row.
    assert by_system["ours, auto"]["first_tokens"] == by_system["accelerate"]["first_tokens"]
    text = doc.read_text()
    assert "OLD" not in text and text.endswith("end\n")
    assert "| ours, fixed | 2 | bfloat16 |" in text and "2/2 prompts equal" in text
    assert "Stock transformers is not run" in text
    assert (tmp_path / "beyond_ram.png").stat().st_size > 1000


def test_first_tokens_are_compared_only_in_the_same_dtype(beyond_ram):
    from _beyond_ram_report import _agreement

    def ran(system: str, dtype: str, tokens: list[int]) -> dict:
        return dict(system=system, dtype=dtype, batch=2, first_tokens=tokens)

    text = _agreement(
        [
            ran("ours, auto", "bfloat16", [5, 6]),
            ran("accelerate", "float32", [5, 7]),
            ran("accelerate", "bfloat16", [5, 7]),
        ]
    )
    assert "(bfloat16) vs accelerate b2 (float32): not compared, other dtypes" in text
    assert "ours, auto vs accelerate b2: 1/2 prompts equal" in text
