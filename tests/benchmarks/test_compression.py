"""The compression benchmark runs both scenarios end to end on a tiny shape (numbers unchecked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def compression(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS))  # the spawned runs import the scripts
    # Fresh, together: a child's function pickles by the ``_common`` in sys.modules, which
    # other benchmark tests drop and re-import.
    scripts = ("compression", "checkpoints", "_cgroup", "_common")
    for name in scripts:
        sys.modules.pop(name, None)
    import compression

    yield compression
    for name in scripts:
        sys.modules.pop(name, None)


def test_runs_both_scenarios_and_writes_the_tables(compression, tmp_path):
    from _cgroup import MemoryCgroup

    probe, _ = MemoryCgroup.make("probe", 0)
    if probe is None:
        pytest.skip("the capped scenario needs a memory cgroup (root, cgroup v1)")
    probe.remove()
    doc = tmp_path / "compression.md"
    doc.write_text(
        "# C\n\n<!-- benchmark:compression:start -->\nOLD\n<!-- benchmark:compression:end -->\n"
    )
    data = compression.main(
        [
            "--shape=opt-tiny",
            "--batches=2",
            "--budget=512MiB",
            "--dtypes=float32",
            "--capped-dtype=float32",
            "--prompt-len=8",
            "--gen-len=2",
            f"--model-dir={tmp_path / 'ckpt'}",
            f"--offload-dir={tmp_path / 'work'}",
            f"--docs={doc}",
        ]
    )
    capped, resident = data["results"]["capped"], data["results"]["resident"]
    assert set(capped) == {"plain @ batch 2", "4-bit @ batch 2"}
    assert set(resident) == {"plain, float32", "4-bit, float32", "4-bit, dequantizing, float32"}
    for r in [*capped.values(), *resident.values()]:
        assert r["tokens_per_s"] > 0 and len(r["first_tokens"]) in (1, 2)
    assert capped["4-bit @ batch 2"]["resident"] < capped["plain @ batch 2"]["resident"]
    assert all(r["cgroup_peak"] > 0 for r in capped.values())
    assert resident["4-bit, dequantizing, float32"]["kernel_rows"] == 0
    text = doc.read_text()
    assert "OLD" not in text and "| 4-bit | 2 |" in text and "| plain, float32 |" in text
    # Saved, and reported again from the file.
    again = compression.main(
        [f"--from-json={tmp_path / 'work' / 'compression.json'}", "--no-write"]
    )
    assert again == data
