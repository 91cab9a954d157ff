"""The throughput benchmark runs end to end on a tiny model (its numbers are not checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ..planning.test_hardware import make_profile
from .conftest import seed_profile

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


# bf16 20x faster than fp32 at every row count: every system should run bf16.
SLOW = {1: 1e9, 16: 5e9, 256: 10e9}
FAST = {rows: 20 * rate for rows, rate in SLOW.items()}


@pytest.fixture
def throughput(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    for dtype, rates in ((torch.float32, SLOW), (torch.bfloat16, FAST)):  # opt-tiny's shape
        seed_profile(tmp_path / "cache", tmp_path / "work", (64, 256), dtype, matmul_flops=rates)
    # The children are spawned: they import the scripts through PYTHONPATH, like the parent.
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS))
    import throughput

    yield throughput
    for name in ("throughput", "checkpoints", "_throughput_plan", "_throughput_report"):
        sys.modules.pop(name, None)


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
        # --dtype auto: the baselines get the faster dtype, ours measures and picks it too.
        assert r.dtype == "bfloat16", r.run
        assert r.run.dtype == ("auto" if r.run.kind == "ours" else "bfloat16")
    fixed = next(r for r in results if r.run.system == "ours, fixed split")
    assert fixed.disk_read_per_step > 0, "75% of the weights are read from disk every step"
    text = doc.read_text()
    assert "PREVIOUS-TABLE" not in text and text.endswith("tail\n")
    assert "| resident | stock transformers | 2 | bfloat16 |" in text
    assert "Each system at its best compute dtype (`--dtype auto`" in text
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in text
    assert "roofline" in text and "throughput.png" in text
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    budgeted = [r for r in results if r.run.budget is not None]
    if _cgroups_available():  # each budgeted run was held by a cgroup: page cache counted
        assert all(r.cgroup_peak and max(r.cgroup_peak) > 0 for r in budgeted)
        assert "inside a memory cgroup" in text
    else:
        assert not any(r.cgroup_peak for r in budgeted) and "RSS sampled" in text


@pytest.mark.parametrize(
    "batch, prompt_len, expected", [(1, 1, "float32"), (64, 64, "bfloat16")], ids=["b1", "b64"]
)
def test_the_baselines_get_the_faster_dtype_at_their_rows(throughput, batch, prompt_len, expected):
    """fp32 faster at one row, bf16 at many (an AMX CPU's shape): the batch decides."""
    from _common import fastest_dtype

    profiles = {
        "float32": make_profile(matmul_flops={1: 10e9, 256: 20e9}),
        "bfloat16": make_profile(matmul_flops={1: 2e9, 256: 200e9}),
    }
    assert fastest_dtype(profiles, batch, prompt_len, gen_len=8) == expected


def test_a_forced_dtype_runs_every_system_in_it(throughput):
    args = throughput.parse_args(["--model=opt-tiny", "--dtype=float32", "--ours-batches=2"])
    shape = throughput.OPTShape.from_config(throughput.opt_config("opt-tiny"))
    profiles = {"float32": make_profile(matrix=(64, 256))}
    runs = throughput.plan_runs(args, profiles, shape, weight_bytes=2**20)
    assert {r.kind for r in runs} == {"stock", "accelerate", "ours"}
    assert {r.dtype for r in runs} == {"float32"}


def _cgroups_available() -> bool:
    from _cgroup import MemoryCgroup

    group, _ = MemoryCgroup.make("probe", 0)
    if group is not None:
        group.remove()
    return group is not None
