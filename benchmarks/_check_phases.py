"""The phases of ``gpu_check.py`` that are not throughput runs, one per process::

    python benchmarks/_check_phases.py PHASE SPEC_JSON RESULT_FILE

Each writes one JSON object to RESULT_FILE (``status``: ok, skipped with a ``reason``, or
failed with an ``error``); an exception writes nothing and the parent records the failure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "flexgen",
    "pulp",
    "highspy",
    "numpy",
    "safetensors",
    "attrs",
    "huggingface-hub",
)
# What `import hf_flexoffload` imports (datasets and rouge-score only the eval commands do).
REQUIRED = (
    "torch",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "pulp",
    "highspy",
    "tqdm",
)
# Golden placements (tests/modeling/test_causal_lm.py's): device, host, disk, mixed,
# micro-batches, all.
GOLDEN = (
    "all_device",
    "weights_host",
    "weights_mixed",
    "cache_host_host_attention",
    "cache_disk",
    "micro_batches_uneven",
    "everything_offloaded_overlap",
)
# Micro-batches change GEMM shapes (cuBLAS, MKL may pick other kernels) and host attention
# runs on the CPU: logits agree to fp32 rounding, not bit for bit (tests/test_cuda.py's).
TOLERANCE = {"float32": dict(atol=1e-3, rtol=1e-4), "float16": dict(atol=2e-2, rtol=0.0)}


def env(spec: dict) -> dict:
    """Versions, the device as torch and the driver see it, and whether we can import."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out = {
        "python": platform.python_version(),
        "versions": versions,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_memory=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
        smi = subprocess.run(query, capture_output=True, text=True)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    os.makedirs(spec["work_dir"], exist_ok=True)
    out["work_dir_free"] = shutil.disk_usage(spec["work_dir"]).free
    with open("/proc/meminfo") as f:  # ours sizes the host tier from it (a VM's may grow later)
        out["meminfo"] = {
            k: v.strip()
            for k, v in (line.split(":", 1) for line in f)
            if k in ("MemTotal", "MemAvailable")
        }
    cuda = torch.device(spec["device"]).type == "cuda"
    if cuda and not torch.cuda.is_available():
        error = f"--device cuda, but torch {torch.__version__} sees no CUDA device"
        return {**out, "status": "failed", "error": error}
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        error = f"missing {', '.join(missing)}: install the wheels docs/gpu.md lists"
        return {**out, "status": "failed", "error": error}
    if cuda:  # another machine's environment than `make venv`'s: importing is the check
        try:
            import hf_flexoffload
        except ImportError as err:
            return {**out, "status": "failed", "error": f"cannot import hf_flexoffload: {err}"}
        out["hf_flexoffload"] = hf_flexoffload.__file__
    return {**out, "status": "ok"}


def probe(spec: dict) -> dict:
    """Our hardware profile of the device, measured (and cached for ``ours-auto``)."""
    import _device
    from checkpoints import opt_config

    from hf_flexoffload.planning.budget import parse_size
    from hf_flexoffload.planning.hardware import HardwareProfile

    device = _device.resolve(spec["device"])
    cap = parse_size(spec["cap"]) if spec["cap"] else None
    _device.cap_memory(device, cap)
    config = opt_config(spec["model"])
    start = time.perf_counter()
    profile = HardwareProfile.measure(
        device,
        getattr(torch, spec["dtype"]),
        offload_dir=spec["work_dir"],
        matrix=(config.hidden_size, config.ffn_dim),
        max_memory={"device": cap} if cap and device.type == "cuda" else None,
    )
    return {
        "status": "ok",
        "seconds": time.perf_counter() - start,
        "profile": profile.to_dict(),
        "text": profile.describe(),
    }


def golden(spec: dict) -> dict:
    """Ours against stock on the device, tests/modeling/test_causal_lm.py's tiny models and
    placements: greedy tokens equal, logits within ``TOLERANCE``."""
    sys.path.insert(0, ROOT)
    import _device
    from tests.conftest import batch, build_model, tiny_config
    from tests.modeling.test_causal_lm import PLACEMENTS

    from hf_flexoffload import FlexOffloadOPTForCausalLM

    device = _device.resolve(spec["device"])
    if device.type == "cuda":  # and fp16, with the cache on the host, attended there
        cases = [(v, p, "float32") for v in ("pre_ln", "post_ln") for p in GOLDEN]
        cases.append(("pre_ln", "cache_host_host_attention", "float16"))
    else:  # tests/modeling/test_causal_lm.py checks every placement on the CPU; three run here
        cases = [
            ("pre_ln", "all_device", "float32"),
            ("post_ln", "weights_mixed", "float32"),
            ("pre_ln", "everything_offloaded_overlap", "float32"),
        ]
    rows, work, models = [], os.path.join(spec["work_dir"], "golden"), {}
    ids, mask = (t.to(device) for t in batch())
    for variant, placement, dtype in cases:
        path = os.path.join(work, f"{variant}-{dtype}")
        if path not in models:  # one stock model and checkpoint per variant and dtype
            models[path] = build_model(tiny_config(variant)).to(device, getattr(torch, dtype))
            models[path].save_pretrained(path)
        stock = models[path]
        kw = dict(
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
        expected = stock.generate(ids, **kw)
        with FlexOffloadOPTForCausalLM.from_pretrained(
            path, offload_policy=PLACEMENTS[placement], device=device, dtype=getattr(torch, dtype)
        ) as model:
            got = model.generate(ids, **kw)
        diff = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(got.scores, expected.scores, strict=True)
        )
        close = all(
            torch.allclose(a.float(), b.float(), **TOLERANCE[dtype])
            for a, b in zip(got.scores, expected.scores, strict=True)
        )
        equal = torch.equal(got.sequences.cpu(), expected.sequences.cpu())
        rows.append(
            {
                "variant": variant,
                "placement": placement,
                "dtype": dtype,
                "tokens_equal": equal,
                "max_logit_diff": diff,
                "logits_close": close,
            }
        )
    shutil.rmtree(work, ignore_errors=True)
    tokens_equal = all(r["tokens_equal"] for r in rows)
    ok = tokens_equal and all(r["logits_close"] for r in rows)
    bad = [
        f"{r['variant']}/{r['placement']}/{r['dtype']}"
        for r in rows
        if not (r["tokens_equal"] and r["logits_close"])
    ]
    return {
        "status": "ok" if ok else "failed",
        "tokens_equal": tokens_equal,
        "cases": rows,
        "tolerance": TOLERANCE,
        **({"error": f"differs from stock: {bad}"} if bad else {}),
    }


def overlap(spec: dict) -> dict:
    """On CUDA: host-tier weights copied on a side stream while the GEMMs run. One generate is
    profiled (how much copy time overlapped compute) and timed with and without overlap."""
    import _device
    from _overlap_trace import overlap_stats
    from checkpoints import opt_config, write_random_checkpoint

    from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

    device = _device.resolve(spec["device"])
    config = opt_config("opt-1.3b")
    config.num_hidden_layers = 8  # 1 GB of fp16 weights: copies long enough to see
    path = write_random_checkpoint(
        os.path.join(spec["work_dir"], "overlap-opt-1.3b-8l"), config, torch.float16, device=device
    )
    ids = torch.randint(3, 50000, (8, 128), device=device)
    times, stats = {}, None
    for on in (True, False):
        policy = Policy(micro_batch_size=8, weights=Split(host=1.0), overlap=on)
        with FlexOffloadOPTForCausalLM.from_pretrained(
            path, offload_policy=policy, device=device, dtype=torch.float16
        ) as model:
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
            _device.synchronize(device)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            _device.synchronize(device)
            times[on] = time.perf_counter() - start
            if on:
                stats = _profiled(model, ids, spec["work_dir"], overlap_stats)
    ok = stats["side_copies"] > 0
    return {
        "status": "ok" if ok else "failed",
        **stats,
        "seconds_overlap": times[True],
        "seconds_no_overlap": times[False],
        "speedup": times[False] / times[True],
        **({} if ok else {"error": "no host-to-device copy ran on a side stream"}),
    }


def _profiled(model, ids: torch.Tensor, work_dir: str, analyze) -> dict:
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    trace = os.path.join(work_dir, "overlap-trace.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        return analyze(json.load(f)["traceEvents"])


def checkpoint(spec: dict) -> dict:
    """The random checkpoint the throughput phases load, drawn on the device (once)."""
    from checkpoints import checkpoint_name, opt_config, write_random_checkpoint

    config = opt_config(spec["model"])
    dtype = getattr(torch, spec["checkpoint_dtype"])
    scale = spec["weight_scale"]
    name = checkpoint_name(spec["model"], spec["checkpoint_dtype"], scale)
    path = os.path.join(spec["checkpoint_dir"], name)
    with torch.device("meta"):
        from transformers import OPTForCausalLM

        need = sum(p.numel() for p in OPTForCausalLM(config).parameters()) * dtype.itemsize
    os.makedirs(spec["checkpoint_dir"], exist_ok=True)
    free = shutil.disk_usage(spec["checkpoint_dir"]).free
    exists = os.path.exists(os.path.join(path, "config.json"))
    if not exists and free < need * 1.1:
        return {"status": "failed", "error": f"{free} bytes free, the checkpoint needs {need}"}
    start = time.perf_counter()
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    write_random_checkpoint(path, config, dtype, device=draw, scale=scale)
    return {
        "status": "ok",
        "path": path,
        "weight_scale": scale,
        "bytes": need,
        "reused": exists,
        "seconds": time.perf_counter() - start,
    }


def cuda_tests(spec: dict) -> dict:
    """tests/test_cuda.py (they skip without a GPU), with a JUnit report."""
    report = os.path.join(spec["work_dir"], "cuda-tests.xml")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_cuda.py",
        f"--junitxml={report}",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return pytest_result(run)


def pytest_result(run: subprocess.CompletedProcess) -> dict:
    """A pytest run as a phase result. Its stderr (a crash's traceback, a fatal CUDA error)
    is kept: printed to the phase's log whole, and its tail in the error after stdout's."""
    sys.stdout.write(run.stdout)
    if run.stderr:
        print("--- pytest's stderr ---")
        sys.stdout.write(run.stderr)
    lines = [line for line in run.stdout.strip().splitlines() if line.strip()]
    if run.returncode == 0:
        return {"status": "ok", "summary": lines[-1] if lines else "", "returncode": 0}
    error = run.stdout[-2000:]
    if run.stderr.strip():
        error = f"{error}\n--- stderr ---\n{run.stderr[-2000:]}"
    if not error.strip():
        error = f"pytest exited with {run.returncode} and printed nothing"
    return {
        "status": "failed",
        "summary": lines[-1] if lines else f"exit {run.returncode}",
        "returncode": run.returncode,
        "error": error,
    }


PHASES = {
    "env": env,
    "probe": probe,
    "golden": golden,
    "overlap": overlap,
    "checkpoint": checkpoint,
    "cuda-tests": cuda_tests,
}


def main(argv: list[str]) -> None:
    phase, spec, out = argv
    result = PHASES[phase](json.loads(spec))
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("cases", "profile")}))


if __name__ == "__main__":
    main(sys.argv[1:])
