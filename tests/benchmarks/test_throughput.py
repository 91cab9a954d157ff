"""The throughput benchmark runs end to end on a tiny model (its numbers are not checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def throughput(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path / "cache"))
    # The children are spawned: they import the scripts through PYTHONPATH, like the parent.
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS))
    import throughput

    yield throughput
    sys.modules.pop("throughput", None)
    sys.modules.pop("checkpoints", None)


def test_suite_runs_and_writes_its_table_and_plot(throughput, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n<!-- benchmark:throughput:start -->\nPREVIOUS-TABLE\n"
        "<!-- benchmark:throughput:end -->\ntail\n"
    )
    results = throughput.main(
        [
            "--model=opt-tiny",
            "--prompt-len=4",
            "--gen-len=3",
            "--resident-batches=2",
            "--ours-resident-batches=2",
            "--auto-max-batch=2",
            "--offload-batches=2",
            "--ours-batches=2",
            "--repeats=1",
            "--working-memory=512MiB",  # in a cgroup, lazily imported modules count too
            f"--checkpoint-dir={tmp_path / 'ckpt'}",
            f"--work-dir={tmp_path / 'work'}",
            f"--doc={doc}",
            f"--plot={tmp_path / 'throughput.png'}",
        ]
    )
    systems = {(r.run.config, r.run.system) for r in results}
    assert systems == {
        ("resident", "stock transformers"),
        ("resident", "ours, all resident"),
        ("offload", "accelerate device_map"),
        ("offload", "ours, fixed split"),
        ("cold disk", "ours, O_DIRECT"),
        ("offload", "ours, auto"),
    }
    for r in results:
        assert len(r.tokens_per_s) == 1 and r.tokens_per_s[0] > 0, r.run
        assert r.peak and r.prefill_s[0] > 0
    fixed = next(r for r in results if r.run.system == "ours, fixed split")
    assert fixed.disk_read_per_step > 0, "75% of the weights are read from disk every step"
    text = doc.read_text()
    assert "PREVIOUS-TABLE" not in text and text.endswith("tail\n")
    assert "| resident | stock transformers | 2 |" in text
    assert "roofline" in text and "throughput.png" in text
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    budgeted = [r for r in results if r.run.budget is not None]
    if _cgroups_available():  # each budgeted run was held by a cgroup: page cache counted
        assert all(r.cgroup_peak and max(r.cgroup_peak) > 0 for r in budgeted)
        assert "inside a memory cgroup" in text
    else:
        assert not any(r.cgroup_peak for r in budgeted) and "RSS sampled" in text


def _cgroups_available() -> bool:
    from _cgroup import MemoryCgroup

    group, _ = MemoryCgroup.make("probe", 0)
    if group is not None:
        group.remove()
    return group is not None
