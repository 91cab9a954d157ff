"""The prepared GPU check runs end to end on the CPU with a tiny shape (its numbers are not
checked), and its pure parts do what they say."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from hf_flexoffload import Split

from .conftest import seed_profile

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/gpu_check.py` sees it
    yield
    for name in (
        "gpu_check",
        "_check_report",
        "_check_phases",
        "_check_shapes",
        "_overlap_trace",
        "_flexgen",
        "checkpoints",
    ):
        sys.modules.pop(name, None)


def test_runs_every_phase_on_cpu_and_reruns_only_what_is_missing(benchmarks, tmp_path, monkeypatch):
    import gpu_check
    from checkpoints import opt_config

    config = opt_config(gpu_check.SHAPES["tiny"].model)
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path / "cache"))
    rates = seed_profile(tmp_path / "cache", work, (config.hidden_size, config.ffn_dim))
    argv = ["--device", "cpu", "--shape", "tiny", "--out", str(out), "--work-dir", str(work)]

    start = time.perf_counter()
    assert gpu_check.main(argv) == 0
    seconds = time.perf_counter() - start

    records = {p: json.loads((out / f"{p}.json").read_text()) for p in gpu_check.PHASES}
    for phase, r in records.items():
        assert r["status"] in ("ok", "skipped"), (phase, r)
        assert r["status"] == "ok" or r["reason"], (phase, r)
    skipped = {p for p, r in records.items() if r["status"] == "skipped"}
    # CUDA-only
    assert skipped == {"overlap", "cuda-tests", "throughput-flexgen", "throughput-flexgen-offload"}
    assert records["golden"]["tokens_equal"] and records["golden"]["cases"]
    assert records["probe"]["profile"]["matmul_flops"] == rates["matmul_flops"]  # not measured
    runs = {p.removeprefix("throughput-"): r for p, r in records.items() if r.get("tokens")}
    assert set(runs) == {"stock", "accelerate", "ours-fixed", "ours-offload", "ours-auto"}
    assert runs["ours-offload"]["policy"]["host_attention"]  # FlexGen's --cpu-cache-compute
    assert all(r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in runs.values())
    assert runs["ours-fixed"]["tokens"] == runs["stock"]["tokens"]  # same prompts, same rows
    assert runs["ours-auto"]["batch"] <= gpu_check.SHAPES["tiny"].auto_max_batch
    summary = (out / "summary.md").read_text()
    assert "| throughput-ours-fixed | ok |" in summary and "| ours-fixed | 4 |" in summary
    assert seconds < 240, f"the CPU smoke run took {seconds:.0f} s"
    import _check_report

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n{_check_report.START}\nNot run yet.\n{_check_report.END}\ntail\n")
    _check_report.main([str(out), "--doc", str(doc)])
    assert "Not run yet" not in doc.read_text() and summary in doc.read_text()

    # --missing: nothing is ok-less but the skipped CUDA phases, which need no process.
    before = {p: (out / f"{p}.json").stat().st_mtime_ns for p in records}
    start = time.perf_counter()
    assert gpu_check.main([*argv, "--missing"]) == 0
    assert time.perf_counter() - start < 5
    after = {p: (out / f"{p}.json").stat().st_mtime_ns for p in records}
    assert {p for p in records if after[p] != before[p]} == skipped


def test_phase_groups_and_unknown_phases(benchmarks, tmp_path):
    import gpu_check

    args = gpu_check.parse_args(["--phases", "env,throughput", "--out", str(tmp_path)])
    assert gpu_check.selected(args) == ["env", *(f"throughput-{s}" for s in gpu_check.SYSTEMS)]
    with pytest.raises(SystemExit, match="unknown phases"):
        gpu_check.selected(gpu_check.parse_args(["--phases", "throughput-fast"]))


def test_overlap_counts_side_stream_copy_time_under_compute_kernels(benchmarks):
    from _overlap_trace import overlap_stats

    def event(cat, stream, ts, dur, name="kernel"):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [
        event("kernel", 7, 0, 10),
        event("kernel", 7, 10, 10),  # compute busy 0-20 ...
        event("kernel", 7, 40, 10),  # ... and 40-50
        event("kernel", 9, 100, 5),  # a kernel on another stream is not the compute stream's
        event("gpu_memcpy", 13, 15, 30, "Memcpy HtoD (Pinned -> Device)"),  # 5 + 5 under compute
        event("gpu_memcpy", 7, 60, 10, "Memcpy HtoD (Pageable -> Device)"),  # on compute stream
        event("gpu_memcpy", 13, 100, 10, "Memcpy DtoH (Device -> Pinned)"),  # not host to device
    ]
    stats = overlap_stats(events)
    assert stats["compute_stream"] == 7 and stats["side_copies"] == 1 and stats["copies"] == 2
    assert stats["copy_us"] == 30 and stats["overlapped_us"] == 10
    assert stats["overlapped_fraction"] == pytest.approx(1 / 3)
    assert overlap_stats([event("kernel", 7, 0, 10)])["overlapped_fraction"] is None


def test_flexgen_and_ours_get_the_same_policy(benchmarks):
    import _flexgen

    percent = [40, 60, 100, 0, 100, 0]
    flex = _flexgen.policy_kwargs(percent, 8, 2, overlap=True)
    ours = _flexgen.ours_policy(percent, 8, 2, overlap=True)
    assert (flex["gpu_batch_size"], flex["num_gpu_batches"]) == (8, 2)
    assert (ours.micro_batch_size, ours.num_micro_batches) == (8, 2)
    assert (flex["w_gpu_percent"], flex["w_cpu_percent"]) == (40, 60)
    assert ours.weights == Split(device=0.4, host=0.6)
    assert ours.cache == ours.activations == Split(device=1.0)
    assert ours.overlap and not ours.host_attention and not flex["cpu_cache_compute"]
    assert ours.pin_weights and flex["pin_weight"]
    offload = _flexgen.ours_policy(percent, 8, 2, overlap=True, cpu_cache_compute=True)
    assert offload.host_attention
    assert _flexgen.policy_kwargs(percent, 8, 2, overlap=True, cpu_cache_compute=True)[
        "cpu_cache_compute"
    ]


def test_a_failed_phase_with_an_empty_error_keeps_the_summary(benchmarks, tmp_path):
    import gpu_check
    from _check_report import phase_note, summary

    out = str(tmp_path)
    spec = gpu_check.spec_for(gpu_check.parse_args(["--device", "cpu", "--shape", "tiny"]))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    gpu_check.write(out, {"phase": "golden", "status": "failed", "error": "", "wall_s": 3.0})
    gpu_check.write(out, {"phase": "env", "status": "failed", "error": "\n  \n", "wall_s": 1})
    assert phase_note("golden", {"status": "failed", "error": ""}) == "failed, no reason given"
    text = summary(out, gpu_check.PHASES)
    assert "| golden | failed | 3 | failed, no reason given |" in text


def test_cuda_tests_keep_pytests_stderr(benchmarks, tmp_path, monkeypatch, capsys):
    """A crash (a segfault in a CUDA kernel) prints its traceback on stderr, not stdout."""
    import subprocess

    import _check_phases

    crash = "Fatal Python error: Segmentation fault\n  File tests/test_cuda.py, line 80"

    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, -11, stdout="", stderr=crash)

    monkeypatch.setattr(_check_phases.subprocess, "run", run)
    result = _check_phases.cuda_tests({"work_dir": str(tmp_path)})
    assert result["status"] == "failed" and "Segmentation fault" in result["error"]
    assert crash in capsys.readouterr().out  # the phase's log has it whole


def test_phases_run_by_value_and_the_budget_skips_rather_than_fails(
    benchmarks, tmp_path, monkeypatch
):
    """A phase past its own timeout fails; one the run's budget cuts off, or has no time left
    for, is skipped saying so (for --missing)."""
    import gpu_check

    phases = gpu_check.PHASES
    assert phases[:4] == ("env", "golden", "cuda-tests", "overlap")
    first_row = min(i for i, p in enumerate(phases) if p.startswith("throughput-"))
    assert phases.index("probe") < phases.index("checkpoint") < first_row
    ran = []

    def command(phase, spec, result):
        ran.append(phase)
        if phase in ("golden", "cuda-tests"):
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        env = {"status": "ok", "torch": "2", "torch_cuda": None, "python": "3"}
        write = f"import json, sys; json.dump({env!r}, open(sys.argv[1], 'w'))"
        return [sys.executable, "-c", write, result]

    monkeypatch.setattr(gpu_check, "command", command)
    monkeypatch.setattr(gpu_check, "parent_skip", lambda phase, spec: None)
    monkeypatch.setattr(gpu_check, "MIN_PHASE_SECONDS", 0)
    monkeypatch.setattr(gpu_check, "TIMEOUTS", {p: 600 for p in phases} | {"golden": 1})
    monkeypatch.setattr(gpu_check, "ESTIMATES", {p: 0 for p in phases} | {"overlap": 1000})
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--shape", "tiny", "--out", str(out), "--budget", "5"]
    assert gpu_check.main([*argv, "--phases", "probe,overlap,cuda-tests,golden,env"]) == 1
    assert ran == ["env", "golden", "cuda-tests"]
    records = {p: json.loads((out / f"{p}.json").read_text()) for p in [*ran, "overlap", "probe"]}
    assert records["env"]["status"] == "ok"
    assert records["golden"]["status"] == "failed" and "timed out" in records["golden"]["error"]
    cut = records["cuda-tests"]
    assert cut["status"] == "skipped" and "cut off by the run's budget" in cut["reason"]
    assert "--missing" in cut["reason"]
    for phase in ("overlap", "probe"):
        assert records[phase]["status"] == "skipped"
        assert records[phase]["reason"].startswith("not started: needs about")


def test_the_offload_rows_run_flexgens_policy_for_a_model_that_does_not_fit(benchmarks):
    import gpu_check

    args = gpu_check.parse_args(["--shape", "opt-6.7b"])
    spec = gpu_check.spec_for(args)
    ours = gpu_check.command("throughput-ours-offload", spec, "r.json")
    flex = gpu_check.command("throughput-flexgen-offload", spec, "r.json")
    fixed = gpu_check.command("throughput-ours-fixed", spec, "r.json")

    def arg(cmd, name, n=1):
        i = cmd.index(name)
        return cmd[i + 1 : i + 1 + n]

    assert arg(ours, "--system") == ["ours-fixed"] and arg(flex, "--system") == ["flexgen"]
    for cmd in (ours, flex):
        assert arg(cmd, "--percent", 6) == ["20", "80", "0", "100", "0", "100"]
        assert arg(cmd, "--gpu-batch-size") == ["48"] and arg(cmd, "--num-gpu-batches") == ["3"]
        assert "--cpu-cache-compute" in cmd and "--no-overlap" not in cmd
        assert arg(cmd, "--device-cap") == ["6GiB"]  # under the shape's 12.4 GiB of weights
    assert arg(fixed, "--percent", 6) == ["100", "0", "100", "0", "100", "0"]
    assert arg(fixed, "--device-cap") == ["16GiB"] and "--cpu-cache-compute" not in fixed


def test_tokens_that_part_at_a_near_tie_are_told_from_wrong_ones(benchmarks):
    from _check_report import same_tokens

    stock = {
        "system": "stock",
        "status": "ok",
        "tokens": [[5, 6, 7], [1, 2, 3], [4, 4, 4]],
        "margins": [[3.0, 2.0, 2.0], [2.0, 0.01, 1.0], [2.0, 2.0, 2.0]],
    }
    ours = {
        "system": "ours-fixed",
        "tokens": [[5, 6, 7], [1, 9, 9], [4, 4, 4]],
        "margins": [[3.0, 2.0, 2.0], [2.0, 0.02, 1.0], [2.0, 2.0, 2.0]],
    }
    assert same_tokens(ours, stock, near_tie=0.05).startswith("yes, but 1/3 rows part")
    ours["tokens"][2] = [4, 8, 8]  # parts where stock's choice was clear: wrong
    assert same_tokens(ours, stock, near_tie=0.05) == "1/3 rows, 1 more part at a near-tie"
    ours["tokens"] = stock["tokens"]
    assert same_tokens(ours, stock) == "yes"
