"""Generation throughput side by side: stock transformers, accelerate offloading, and ours.

Every run is one ``generate`` of one batch of the same random prompts in a fresh process:

* **stock**: ``OPTForCausalLM`` with everything in RAM, the compute ceiling (no budget).
* **accelerate**: ``device_map="auto"`` with ``max_memory={"cpu": <weight share>}`` and an
  ``offload_folder``: the rest of the weights on disk, what users run today.
* **ours**: ``FlexOffloadOPTForCausalLM`` with fixed policies (everything resident; weights 25% in
  RAM and 75% on disk, read through the page cache or directly with ``O_DIRECT``) and
  ``offload_policy="auto"`` under the same RAM budget.

Each system computes in its best dtype here (``--dtype auto``, the default): ours loads with
``dtype="auto"`` (measured), stock and accelerate run the dtype whose measured matmul rates are
faster at the model's shape for the run's batch; ``--dtype float32`` (or another) forces one
dtype on every system. The table states each row's dtype.

Throughput is FlexGen's: generated tokens / (prefill + decode time), the wall time of
``generate``. The offloading systems must fit the RAM budget: their peak anonymous RSS above the
process's baseline (sampled every 10 ms; page-cache and mapped-file pages are the kernel's to
drop, so they do not count) must stay within it. Each system's row is its best batch size that
fits, medians over alternating repeats; ratios are computed within the run.

The roofline bound of a configuration is its time if compute ran at the measured matmul rate
for its row counts and disk reads at the measured bandwidth, fully overlapped:
``sum over steps of max(FLOPs / rate, bytes read / bandwidth)``, weights read with O_DIRECT at
the cold rate and every other disk read (cached weights, KV cache) at the page-cache rate.

Usage::

    python benchmarks/throughput.py                 # the CPU suite (make bench)
    python benchmarks/throughput.py --repeats 1 --no-write --only ours
    python benchmarks/throughput.py --device cuda --device-cap 16GiB   # every system on the GPU

On CUDA every system runs on the GPU (stock wholly, accelerate with ``max_memory={0: cap,
"cpu": budget}``, ours with ``device=``), under ``--device-cap``, and the table adds the GPU's
allocated and reserved peaks and torch's pinned-host peak (n/a on the CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import _device
import torch
from _cgroup import MemoryCgroup, run_in_cgroup
from _common import (
    DTYPE_CHOICES,
    AnonPeak,
    dtype_profiles,
    in_fresh_process,
    write_between_markers,
)
from _throughput_plan import Result, Run, plan_runs
from _throughput_report import best_rows, plot, report
from checkpoints import opt_config, write_random_checkpoint
from transformers import LogitsProcessorList, OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size
from hf_flexoffload.planning.hardware import default_cache_dir
from hf_flexoffload.storage.tier_store import dtype_name

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
START, END = "<!-- benchmark:throughput:start -->", "<!-- benchmark:throughput:end -->"
PLOT = os.path.join(os.path.dirname(__file__), "..", "docs", "throughput.png")


# -- one run, in a fresh process -----------------------------------------------------------------


def measure(path: str, run: Run, args: argparse.Namespace) -> dict:
    """Load, then generate one batch; the whole of it is timed and its memory sampled."""
    torch.set_num_threads(args.threads)
    device = _device.resolve(args.device)
    _device.cap_memory(device, args.device_cap)
    dtype = run.dtype if run.dtype == "auto" else getattr(torch, run.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (run.batch, args.prompt_len), generator=g)
    first = _device.FirstToken(device)
    memory = AnonPeak()
    offload_dir = os.path.join(args.work_dir, f"offload-{os.getpid()}")
    out: dict = {}
    try:
        if run.kind == "ours":
            model = FlexOffloadOPTForCausalLM.from_pretrained(
                path,
                offload_policy=run.policy if run.policy == "auto" else Policy.from_dict(run.policy),
                offload_dir=offload_dir,
                device=device,
                dtype=dtype,
                # Fixed policies get the budget too: one over it is refused up front.
                max_memory=_ours_caps(run.budget, args.device_cap),
                workload=Workload(
                    prompt_len=args.prompt_len,
                    gen_len=args.gen_len,
                    max_batch_size=run.batch,
                ),
            )
        elif run.kind == "accelerate":
            model = OPTForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                device_map="auto",
                max_memory=_device.accelerate_max_memory(
                    device, args.device_cap, run.budget - args.working_memory
                ),
                offload_folder=offload_dir,
            )
        else:
            model = OPTForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        if run.policy == "auto":  # the block the auto policy planned, not the sweep's size
            b = model.offload_policy.block_size
            ids = torch.randint(3, 50000, (b, args.prompt_len), generator=g)
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        _device.reset_peaks(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=args.gen_len,
                min_new_tokens=args.gen_len,
                do_sample=False,
                logits_processor=LogitsProcessorList([first]),
            )
        _device.synchronize(device)
        wall = time.perf_counter() - start
        out["device_peaks"] = {
            **_device.peaks(device),
            "registered_host_bytes": _device.registered_host_bytes(model),
        }
        out["tokens_per_s"] = ids.shape[0] * args.gen_len / wall
        out["prefill_s"] = first.at - start
        out["decode_s"] = wall - out["prefill_s"]
        out["batch"] = ids.shape[0]
        out["dtype"] = dtype_name(model.dtype)
        if run.kind == "ours":
            stats = model.generation_stats
            out["disk_read_per_step"] = stats.bytes_moved.get("disk_to_host", 0) / stats.forwards
            # Every step reads the decoder layers' disk bytes and streams the LM head's (the
            # tied embedding matrix: nearly all of stage 0); lookups read a few rows.
            out["weights_read_per_step"] = model.placement_report.bytes_per_tier["disk"]
            out["chosen"] = stats.policy.to_dict()
            model.close()
    finally:
        out["peak"] = memory.stop()
        shutil.rmtree(offload_dir, ignore_errors=True)
    return out


def capped_mode(args: argparse.Namespace) -> str:
    """Check that budgeted runs can be capped with a cgroup (``--cap cgroup``); otherwise fall
    back to RSS sampling with a warning. Returns the sentence the report says about it."""
    if args.cap == "cgroup":
        probe, why = MemoryCgroup.make("probe", 0)
        if probe is not None:
            probe.remove()
            return (
                "Budgeted runs ran inside a memory cgroup of the budget above the process's "
                "baseline, page cache counted, after dropping the page cache: offloaded weights "
                "come from the disk, cold (`--cap cgroup`)."
            )
        print(f"warning: --cap cgroup: {why}; falling back to RSS sampling", file=sys.stderr)
        args.cap = "rss"
        why = f" (no cgroup: {why})"
    else:
        why = ""
    return (
        f"Budgets are peak anonymous RSS sampled every 10 ms{why}: the page cache is outside "
        "them, so a model that fits in RAM is read from RAM in the offload rows."
    )


def run_capped(path: str, run: Run, args: argparse.Namespace, result: Result) -> dict:
    """``measure`` in a fresh process; budgeted runs in a memory cgroup of their budget after
    the page cache is dropped when ``args.cap == "cgroup"``."""
    if run.budget is None or args.cap != "cgroup":
        return in_fresh_process(measure, path, run, args)
    out, peak = run_in_cgroup("throughput", run.budget, measure, path, run, args)
    result.cgroup_peak.append(peak)
    return out


def _ours_caps(budget: int | None, device_cap: int | None) -> dict | None:
    """Ours' ``max_memory``: the RAM budget, and the GPU cap on CUDA."""
    caps = {"host": budget, "device": device_cap}
    return {tier: cap for tier, cap in caps.items() if cap is not None} or None


# -- main ----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", help="an OPT shape (see checkpoints.py)")
    parser.add_argument("--checkpoint-dtype", default="bfloat16")
    parser.add_argument(
        "--dtype",
        "--compute-dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="compute dtype of every system; auto: each at its fastest here (default)",
    )
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--resident-batches", type=_ints, default=[32, 64], help="stock")
    parser.add_argument("--ours-resident-batches", type=_ints, default=[32])
    parser.add_argument("--offload-batches", type=_ints, default=[8, 32], help="accelerate")
    parser.add_argument("--ours-batches", type=_ints, default=[64], help="ours offloaded")
    parser.add_argument("--auto-max-batch", type=int, default=128)
    parser.add_argument("--weights-in-ram", type=float, default=0.25)
    parser.add_argument("--working-memory", type=parse_size, default=parse_size("2GiB"))
    parser.add_argument(
        "--cap",
        choices=["cgroup", "rss"],
        default="cgroup",
        help="how budgets hold: a memory cgroup (page cache counted; needs root) or RSS sampling",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", default=None, help="runs whose 'configuration system' has this")
    parser.add_argument("--work-dir", default=os.path.join(default_cache_dir(), "bench"))
    parser.add_argument("--checkpoint-dir", default=default_cache_dir())
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--no-write", action="store_true", help="print only")
    _device.add_device_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    config = opt_config(args.model)
    shape = OPTShape.from_config(config)
    path = os.path.join(args.checkpoint_dir, f"{args.model}-{args.checkpoint_dtype}")
    print(f"checkpoint: {path}", flush=True)
    write_random_checkpoint(path, config, getattr(torch, args.checkpoint_dtype))
    os.makedirs(args.work_dir, exist_ok=True)
    device = _device.resolve(args.device)
    profiles = dtype_profiles(args.dtype, device, args.work_dir, (shape.hidden, shape.ffn))
    for profile in profiles.values():
        print(profile.describe(), flush=True)
    # The budget's weight share is of the weights in the widest dtype any system may hold.
    itemsize = max(getattr(torch, name).itemsize for name in profiles)
    with torch.device("meta"):
        weight_bytes = sum(p.numel() for p in OPTForCausalLM(config).parameters()) * itemsize
    runs = plan_runs(args, profiles, shape, weight_bytes)
    results = [Result(r) for r in runs]
    args.cap_note = capped_mode(args)
    for repeat in range(args.repeats):
        for result in results:
            run = result.run
            try:
                out = run_capped(path, run, args, result)
            except RuntimeError as err:  # e.g. out of memory: report, do not abort the suite
                result.errors.append(str(err))
                print(f"  {run.config} / {run.system} / b{run.batch}: FAILED {err}", flush=True)
                continue
            result.tokens_per_s.append(out["tokens_per_s"])
            result.prefill_s.append(out["prefill_s"])
            result.decode_s.append(out["decode_s"])
            result.peak.append(out["peak"])
            result.disk_read_per_step = out.get("disk_read_per_step", 0.0)
            result.weights_read_per_step = out.get("weights_read_per_step", 0.0)
            result.chosen = out.get("chosen")
            result.batch = out["batch"]
            result.dtype = out["dtype"]
            result.device_peaks = out["device_peaks"]
            print(
                f"[{repeat + 1}/{args.repeats}] {run.config:<9} {run.system:<24} "
                f"b{out['batch']:<4} {out['dtype']:<8} {out['tokens_per_s']:7.2f} tok/s (prefill "
                f"{out['prefill_s']:.1f}s, decode {out['decode_s']:.1f}s, peak "
                f"{human_bytes(out['peak'])})",
                flush=True,
            )
    text = report(results, args, profiles, shape, weight_bytes)
    print(text)
    if not args.no_write:
        write_between_markers(args.doc, START, END, text + f"\n\n![throughput]({_rel(args)})")
        plot(best_rows(results), args.plot)
        print(f"wrote {os.path.normpath(args.doc)} and {os.path.normpath(args.plot)}")
    return results


def _rel(args: argparse.Namespace) -> str:
    return os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.doc)))


if __name__ == "__main__":
    main()
