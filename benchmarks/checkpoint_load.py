"""The checkpoint as the disk tier, before vs after: load time, bytes written to ``offload_dir``
and generate throughput of a model whose weights are all on disk.

Each version of hf_flexoffload (``--before``: a git revision, checked out into a temporary
worktree; "after": this checkout) loads the same bf16 safetensors checkpoint (OPT-1.3B shape,
random weights, made by ``checkpoints.py``) with ``Split(disk=1.0)``, in a fresh process, once
reading the disk tier through the page cache and once with ``direct_io=True``:

* load: wall seconds of ``from_pretrained`` after the page cache was dropped (as root; without
  root the run says so), and the bytes written under ``offload_dir``;
* generate: tokens/s of ``generate`` (a warm-up call first), FlexGen's metric: generated tokens
  over the wall time of the call. "cached" reads come from the page cache once warm (the machine
  has the RAM for it); "direct_io" reads bypass it, so they cost what cold reads cost.

The compute dtype is measured, not assumed: the faster of fp32 and bf16 for a matmul of the
model's shape on this CPU (``--dtype`` overrides it). The table goes between markers in
docs/benchmarks.md.

Usage::

    python benchmarks/checkpoint_load.py --before 0438bfb
    python benchmarks/checkpoint_load.py --before 0438bfb --device cuda   # computed on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from hf_flexoffload.planning.hardware import default_cache_dir
from hf_flexoffload.planning.probes import cpu_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device
from _common import write_between_markers
from checkpoints import opt_config, write_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
START, END = "<!-- benchmark:checkpoint-load:start -->", "<!-- benchmark:checkpoint-load:end -->"


def drop_page_cache() -> bool:
    """Empty the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def fastest_dtype(hidden: int, ffn: int, batch: int, prompt: int, new: int):
    """The faster compute dtype here for this workload's matmuls, and the seconds of each: one
    (batch * prompt, hidden) x (hidden, ffn) matmul for the prefill plus ``new`` of
    (batch, hidden) x (hidden, ffn) for the decode steps."""

    def seconds(rows: int, dtype: torch.dtype) -> float:
        x, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(ffn, hidden, dtype=dtype)
        torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        return (time.perf_counter() - start) / 3

    total = {
        name: seconds(batch * prompt, getattr(torch, name))
        + new * seconds(batch, getattr(torch, name))
        for name in ("float32", "bfloat16")
    }
    return min(total, key=total.get), total


def read_rates(path: str, nbytes: int = 128 << 20, chunk: int = 4 << 20, repeats: int = 3):
    """Median bytes/s of reading ``nbytes`` of ``path`` in ``chunk``-sized reads: through the
    page cache cold and warm, and with O_DIRECT into a buffer at the file offset's page phase
    (whole blocks land in place) and at another phase (every byte through the bounce buffer).

    The cases alternate, each cold read on a region of its own (the virtual disk's host may
    cache what was read), all from an offset that is not block-aligned, as checkpoint tensors
    are not."""
    from hf_flexoffload.storage.disk_file import DiskFile
    from hf_flexoffload.storage.transfer import PAGE, aligned_empty, at_phase

    cases = (
        ("page cache, cold", False, True, True),
        ("page cache, warm", False, True, False),
        ("O_DIRECT, buffer at the file's phase", True, True, True),
        ("O_DIRECT, buffer at another phase", True, False, True),
    )
    rates: dict[str, list[float]] = {name: [] for name, *_ in cases}
    region = 0
    for _ in range(repeats):
        for name, direct, same_phase, cold in cases:
            if cold:
                region += 1
                drop_page_cache()
            offset = region * nbytes + 200
            f = DiskFile(path, direct=direct)
            phase = offset % PAGE if same_phase else 0
            buf = at_phase(aligned_empty((chunk + PAGE,), torch.uint8), chunk, phase)
            start = time.perf_counter()
            for done in range(0, nbytes, chunk):
                f.read_into(offset + done, buf)
            rates[name].append(nbytes / (time.perf_counter() - start))
            f.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def child(spec: dict) -> dict:
    """One version, one read mode: load, then warm up and time ``generate``."""
    import hf_flexoffload
    from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split

    offload = tempfile.mkdtemp(dir=spec["scratch"])
    policy = Policy(weights=Split(disk=1.0), direct_io=spec["direct_io"])
    device = _device.resolve(spec["device"])
    _device.reset_peaks(device)
    dropped = drop_page_cache()
    start = time.perf_counter()
    model = FlexOffloadOPTForCausalLM.from_pretrained(
        spec["checkpoint"],
        offload_policy=policy,
        device=device,
        dtype=spec["dtype"],
        offload_dir=offload,
    )
    load = time.perf_counter() - start
    written = _dir_bytes(offload)
    # Both versions then fill the page cache the same way, by reading: pages a load has just
    # written are copied out measurably faster than pages read in from disk.
    drop_page_cache()
    ids = torch.randint(3, 50000, (spec["batch"], spec["prompt"])).to(device)
    model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=spec["new"], min_new_tokens=spec["new"], do_sample=False)
    _device.synchronize(device)
    seconds = time.perf_counter() - start
    stats = model.generation_stats
    model.close()
    shutil.rmtree(offload, ignore_errors=True)
    return {
        "package": os.path.dirname(hf_flexoffload.__file__),
        "cache_dropped": dropped,
        "load_seconds": load,
        "written_bytes": written,
        "tokens_per_second": spec["batch"] * spec["new"] / seconds,
        "disk_read_per_step": stats.bytes_moved.get("disk_to_host", 0) / max(1, stats.forwards),
        **_device.peaks(device),
    }


def run_version(src: str, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"the run with {src} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(src):
        raise RuntimeError(f"expected the package from {src}, ran {result['package']}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision of the 'before' run (required)")
    parser.add_argument("--shape", default="opt-1.3b")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the faster here)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per row")
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--dir", default=default_cache_dir(), help="checkpoints and scratch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    _device.add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if not args.before:
        parser.error("--before REVISION is required (e.g. the commit before issue 16: 0438bfb)")

    config = opt_config(args.shape)
    checkpoint = write_random_checkpoint(
        os.path.join(args.dir, f"{args.shape}-bfloat16"), config, torch.bfloat16
    )
    dtype, matmul = fastest_dtype(
        config.hidden_size, config.ffn_dim, args.batch, args.prompt, args.new
    )
    if _device.is_cuda(torch.device(args.device)):
        dtype = "bfloat16"  # the checkpoint's: the CPU's fp32-vs-bf16 race says nothing there
    dtype = args.dtype or dtype
    shard = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))[0]
    rates = read_rates(os.path.join(checkpoint, shard))
    print(rates, flush=True)
    scratch = tempfile.mkdtemp(prefix="checkpoint-load-", dir=args.dir)
    tree = os.path.join(scratch, "before")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "--detach", tree, args.before], check=True
    )
    versions = ((f"before ({args.before})", os.path.join(tree, "src")), ("after", ROOT + "/src"))
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for direct in (False, True):
            mode = "direct_io" if direct else "page cache"
            for _ in range(args.repeats):  # alternate the versions, so drift hits both alike
                for label, src in versions:
                    spec = dict(
                        checkpoint=checkpoint,
                        dtype=dtype,
                        direct_io=direct,
                        scratch=scratch,
                        batch=args.batch,
                        prompt=args.prompt,
                        new=args.new,
                        device=args.device,
                    )
                    result = run_version(src, spec)
                    print(label, mode, result, flush=True)
                    runs.setdefault((label, mode), []).append(result)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    size = sum(
        os.path.getsize(os.path.join(checkpoint, f))
        for f in os.listdir(checkpoint)
        if f.endswith(".safetensors")
    )
    lines = [
        f"Measured on {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}, computed on {args.device}, with "
        f"`python benchmarks/checkpoint_load.py --before {args.before}`.",
        f"{args.shape} shape, random bf16 safetensors checkpoint ({size / 2**30:.2f} GiB), "
        f"`Policy(weights=Split(disk=1.0))`, compute dtype {dtype} (the faster here: one "
        f"{config.hidden_size}x{config.ffn_dim} matmul per prefill and decode step of this "
        "workload took "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in matmul.items())
        + f"), batch {args.batch}, prompt {args.prompt}, {args.new} new tokens. The page cache "
        "is dropped again after the load, so both versions fill it by reading. Load: page "
        + (
            "cache dropped first."
            if all(r["cache_dropped"] for v in runs.values() for r in v)
            else "cache NOT dropped (not root)."
        )
        + f" Medians of {args.repeats} alternating runs (each in brackets), each a fresh process.",
        "",
        "| version | disk reads | load s | written to offload_dir | read per step "
        f"| tokens/s (runs) | {_device.PEAK_HEADER} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, mode), results in runs.items():
        load = statistics.median(r["load_seconds"] for r in results)
        speed = [r["tokens_per_second"] for r in results]
        r = results[0]
        lines.append(
            f"| {label} | {mode} | {load:.1f} | {r['written_bytes'] / 2**30:.2f} GiB | "
            f"{r['disk_read_per_step'] / 2**30:.2f} GiB | {statistics.median(speed):.2f} "
            f"({', '.join(f'{v:.2f}' for v in speed)}) | {' | '.join(_device.peak_cells(r))} |"
        )
    lines += [
        "",
        "Reading the checkpoint in 4 MiB reads from offsets that are not block-aligned "
        "(checkpoint tensors are not), 128 MiB per read, median of 3 alternating runs, each "
        "cold one on a region of its own:",
        "",
        "| read | GB/s |",
        "|---|---|",
        *(f"| {name} | {rate / 1e9:.2f} |" for name, rate in rates.items()),
    ]
    text = "\n".join(lines)
    print(text)
    write_between_markers(DOC, START, END, text)


if __name__ == "__main__":
    main()
