"""The prepared GPU check (issue 19): everything the first machine with a GPU should run.

Phases, in this order (by what a short first run must not miss), each in a fresh process,
each writing ``<out>/<phase>.json`` (``status`` ok, skipped with a ``reason``, or failed with
an ``error``) and ``<out>/<phase>.log`` as soon as it ends:

* ``env``: torch and its CUDA, the GPU, package versions. With ``--device cuda`` and no CUDA,
  or a module hf_flexoffload imports missing (pulp: see docs/gpu.md), the run stops here.
* ``golden``: ours against stock transformers on the device, greedy tokens equal and logits
  within tolerance, for tests/modeling/test_causal_lm.py's tiny OPTs: 7 placements x 2
  variants and fp16 on CUDA; 3 cases on the CPU, where tests/modeling/test_causal_lm.py checks
  them all.
* ``cuda-tests``: tests/test_cuda.py (skipped without a GPU).
* ``overlap``: CUDA only. A profiler trace of one generate with host-tier weights: how much of
  the host-to-device copy time ran on a side stream while the GPU computed; and the same
  generate timed with and without ``overlap``.
* ``probe``: our ``HardwareProfile`` of the device (cached: ``ours-auto`` reuses it).
* ``checkpoint``: the random checkpoint of ``--shape``, drawn on the GPU, written once.
* ``throughput-stock``, ``-ours-fixed``, ``-flexgen``, ``-ours-offload``, ``-flexgen-offload``,
  ``-accelerate``, ``-ours-auto``: ``side_by_side.py``, one process per system, all on
  ``--device`` under ``--cap`` (the per-process memory fraction of the GPU; ours also gets
  ``max_memory={"device": cap}``). FlexGen and ours-fixed run FlexGen's policy of the shape;
  the ``-offload`` rows FlexGen's policy for a model that does not fit, under a smaller cap
  (_check_shapes.py); ours-auto picks its own.

Phases that cannot run here (CUDA-only on the CPU, a package not installed) are skipped with
the reason, without a process. Each phase has a timeout and an expected duration, and the run
a time budget (``--budget``, under 9 minutes by default): a phase the budget no longer has
time for is not started, and one the budget cuts off is killed; both are recorded as skipped,
saying so (only a phase past its own timeout fails), and ``--missing`` runs again only the
phases without an ok result. At the end the summary is printed and written to
``<out>/summary.md`` (the section for docs/benchmarks.md).

Usage::

    python benchmarks/gpu_check.py                         # CUDA, OPT-6.7B shape, 16 GiB cap
    python benchmarks/gpu_check.py --shape opt-13b         # needs 26 GB of disk for its weights
    python benchmarks/gpu_check.py --missing               # what has no ok result yet
    python benchmarks/gpu_check.py --phases golden,throughput-flexgen
    python benchmarks/gpu_check.py --device cpu --shape tiny     # the smoke test (tests/)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

from _check_report import last_line, summary
from _check_shapes import SHAPES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The throughput rows, in the order they run: stock (the tokens' reference), FlexGen's policy
# for the shape (ours-fixed and FlexGen: the 1.5x target), FlexGen's policy for a model that
# does not fit (the ``-offload`` rows), accelerate (3x), then ours choosing its own policy.
SYSTEMS = (
    "stock",
    "ours-fixed",
    "flexgen",
    "ours-offload",
    "flexgen-offload",
    "accelerate",
    "ours-auto",
)
# Ordered by what a short first run must not miss: the environment, golden equality, the CUDA
# tests, the overlap trace; then the probe and checkpoint the throughput rows need, and those.
PHASES = (
    "env",
    "golden",
    "cuda-tests",
    "overlap",
    "probe",
    "checkpoint",
    *(f"throughput-{s}" for s in SYSTEMS),
)
# Seconds each phase may take (on an H200 with the OPT-6.7B shape, about twice what it needs).
TIMEOUTS = {
    "env": 60,
    "golden": 120,
    "cuda-tests": 240,
    "overlap": 120,
    "probe": 150,
    "checkpoint": 180,
    **{f"throughput-{s}": 150 for s in SYSTEMS},
    "throughput-ours-offload": 240,
    "throughput-flexgen-offload": 240,
}
# Seconds each phase is expected to take there, process start-up (imports, CUDA context: 6-10
# s) included: a phase is started only while the budget has this much left; otherwise it is
# skipped, saying so, for a ``--missing`` rerun.
ESTIMATES = {
    "env": 10,
    "golden": 45,
    "cuda-tests": 90,
    "overlap": 50,
    "probe": 45,
    "checkpoint": 60,
    **{f"throughput-{s}": 50 for s in SYSTEMS},
    "throughput-ours-offload": 100,
    "throughput-flexgen-offload": 100,
    "throughput-ours-auto": 70,
}
MIN_PHASE_SECONDS = 15  # never start a phase with less than this left


def spec_for(args: argparse.Namespace) -> dict:
    """What every phase is told: the shape's settings, the device, the cap, the directories."""
    cuda = args.device.startswith("cuda")
    shape = SHAPES[args.shape]
    return {
        **asdict(shape),
        "checkpoint_dtype": shape.dtype,  # random weights, stored as computed
        "shape": args.shape,
        "device": args.device,
        "cap": args.cap if cuda else None,  # the CPU has no device memory of its own
        "offload": {**asdict(shape.offload), "cap": shape.offload.cap if cuda else None},
        "work_dir": os.path.abspath(args.work_dir),
        "checkpoint_dir": os.path.abspath(args.checkpoint_dir or args.work_dir),
    }


def parent_skip(phase: str, spec: dict) -> str | None:
    """Why ``phase`` cannot run here, known without starting it (or None)."""
    cpu = not spec["device"].startswith("cuda")
    if cpu and phase == "overlap":
        return "CPU: no copy streams to overlap (the probe's overlap_penalty measures the CPU)"
    if cpu and phase == "cuda-tests":
        return "CPU: tests/test_cuda.py skips without a GPU"
    if phase.startswith("throughput-flexgen"):
        if importlib.util.find_spec("flexgen") is None:
            return "flexgen is not installed (make gpu-wheels; docs/gpu.md)"
        if cpu:
            return "FlexGen needs CUDA (OptLM creates CUDA streams)"
    if phase == "throughput-accelerate" and importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed"
    return None


def budget_skip(phase: str, left: float, args: argparse.Namespace) -> str | None:
    """Why ``phase`` is not started with ``left`` seconds of the budget (or None): it is
    expected to need more (``ESTIMATES``, x ``--timeout-scale``)."""
    need = max(MIN_PHASE_SECONDS, ESTIMATES[phase] * args.timeout_scale)
    if left >= need:
        return None
    return (
        f"not started: needs about {need:.0f} s, {max(left, 0):.0f} s left of the run's "
        f"{args.budget:.0f} s budget: rerun with --missing"
    )


def command(phase: str, spec: dict, result: str) -> list[str]:
    """The child process of ``phase``, writing its JSON to ``result``."""
    if not phase.startswith("throughput-"):
        script = os.path.join(HERE, "_check_phases.py")
        return [sys.executable, script, phase, json.dumps(spec), result]
    system = phase.removeprefix("throughput-")
    setting = spec
    if system.endswith("-offload"):  # FlexGen's policy for a model that does not fit
        system = {"ours-offload": "ours-fixed", "flexgen-offload": "flexgen"}[system]
        setting = {**spec, **spec["offload"], "overlap": True}
    return [
        sys.executable,
        os.path.join(HERE, "side_by_side.py"),
        "--system",
        system,
        "--model",
        spec["model"],
        "--dtype",
        spec["dtype"],
        "--checkpoint-dtype",
        spec["checkpoint_dtype"],
        "--weight-scale",
        str(spec["weight_scale"]),
        "--prompt-len",
        str(spec["prompt_len"]),
        "--gen-len",
        str(spec["gen_len"]),
        "--percent",
        *map(str, setting["percent"]),
        "--gpu-batch-size",
        str(setting["gpu_batch_size"]),
        "--num-gpu-batches",
        str(setting["num_gpu_batches"]),
        *([] if setting["overlap"] else ["--no-overlap"]),
        *(["--cpu-cache-compute"] if setting.get("cpu_cache_compute") else []),
        "--auto-max-batch",
        str(spec["auto_max_batch"]),
        "--device",
        spec["device"],
        *(["--device-cap", setting["cap"]] if setting["cap"] else []),
        "--checkpoint-dir",
        spec["checkpoint_dir"],
        "--work-dir",
        spec["work_dir"],
        "--out",
        result,
    ]


def run_phase(
    phase: str, spec: dict, out: str, timeout: float, own_timeout: float | None = None
) -> dict:
    """Run one phase in a fresh process (its own process group, killed whole on timeout).
    ``timeout``: what the run's budget allows, at most ``own_timeout`` (the phase's own): a
    phase cut off by the budget is skipped, one past its own timeout failed."""
    own_timeout = timeout if own_timeout is None else own_timeout
    result = os.path.join(out, f"{phase}.result")
    if os.path.exists(result):
        os.remove(result)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The checkout's package, whether or not it is installed (the GPU machine has a copy).
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")])
    )
    start = time.perf_counter()
    with open(os.path.join(out, f"{phase}.log"), "w") as log:
        child = subprocess.Popen(
            command(phase, spec, result),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
    seconds = time.perf_counter() - start
    if os.path.exists(result):
        with open(result) as f:
            data = json.load(f)
        os.remove(result)
    elif code is None and timeout < own_timeout:  # the run's budget, not the phase, ran out
        data = {
            "status": "skipped",
            "reason": f"cut off by the run's budget after {timeout:.0f} s (its own timeout is "
            f"{own_timeout:.0f} s): rerun with --missing",
        }
    elif code is None:
        data = {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
    else:
        data = {"status": "failed", "error": f"exit {code}: {_tail(out, phase)}"}
    return {"phase": phase, **data, "wall_s": seconds}


def _tail(out: str, phase: str, chars: int = 3000) -> str:
    with open(os.path.join(out, f"{phase}.log")) as f:
        return f.read()[-chars:]


def selected(args: argparse.Namespace) -> list[str]:
    """The phases to run: ``--phases`` (``throughput`` means all five), less, with
    ``--missing``, those that already have an ok result in ``--out``."""
    names = args.phases.split(",") if args.phases else list(PHASES)
    groups = {n: [p for p in PHASES if p == n or (n not in PHASES and p.startswith(f"{n}-"))]
              for n in names}  # fmt: skip
    wanted = {p for found in groups.values() for p in found}
    unknown = [n for n, found in groups.items() if not found]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    if args.missing:
        wanted = {p for p in wanted if _status(args.out, p) != "ok"}
    return [p for p in PHASES if p in wanted]


def _status(out: str, phase: str) -> str | None:
    try:
        with open(os.path.join(out, f"{phase}.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError):
        return None


def write(out: str, record: dict) -> None:
    """``<out>/<phase>.json``, atomically (a rerun reads only whole files)."""
    path = os.path.join(out, f"{record['phase']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    note = last_line(record.get("reason") or record.get("error"))
    print(
        f"{record['phase']:<22} {record['status']:<8} {record.get('wall_s', 0):6.1f} s  "
        f"{note[:150]}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu")
    parser.add_argument("--shape", default="opt-6.7b", choices=list(SHAPES))
    parser.add_argument("--cap", default="16GiB", help="GPU memory for each system (CUDA)")
    parser.add_argument("--phases", help=f"comma-separated, of: {', '.join(PHASES)}, throughput")
    parser.add_argument("--missing", action="store_true", help="skip phases already ok in --out")
    parser.add_argument("--out", default=os.path.join(ROOT, ".cache", "gpu-check"))
    parser.add_argument(
        "--work-dir",
        default=os.path.join(ROOT, ".cache", "gpu-check-work"),
        help="checkpoints, offload files, traces (on disk: 13 GB for 6.7B)",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="default: --work-dir")
    parser.add_argument("--budget", type=float, default=520, help="seconds for the whole run")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="x every phase timeout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    spec = spec_for(args)
    with open(os.path.join(args.out, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    deadline = time.perf_counter() + args.budget
    stopped = None  # why the run stopped early (env failed)
    for phase in selected(args):
        left = deadline - time.perf_counter()
        own = TIMEOUTS[phase] * args.timeout_scale
        reason = stopped or parent_skip(phase, spec) or budget_skip(phase, left, args)
        if reason:
            write(args.out, {"phase": phase, "status": "skipped", "reason": reason})
            continue
        record = run_phase(phase, spec, args.out, min(own, left), own)
        write(args.out, record)
        if phase == "env" and record["status"] != "ok":
            stopped = f"env failed: {record.get('error', '')}"
    text = summary(args.out, PHASES)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    statuses = [_status(args.out, p) for p in PHASES]
    return 2 if stopped else int("failed" in statuses)


if __name__ == "__main__":
    sys.exit(main())
