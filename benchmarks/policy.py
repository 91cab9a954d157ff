"""The cost model and the auto policy against measurements, on the OPT-1.3B shape.

Builds (once) a random bf16 OPT-1.3B checkpoint and measures this machine's profile. Then, under
one RAM budget (about a third of the weights), each policy runs in a fresh process: load, then
``generate`` one block of random prompts. The hand-written policies are diverse on purpose (block
size, micro-batching, weight split, cache and activations on disk, no overlap, compression); the
auto policy is ``offload_policy="auto"`` with ``max_memory`` set to the budget. For each, the
cost model's prediction is computed from the profile and compared with the measured throughput.

Peak RSS is measured from just before loading to the end of generating, minus the process's RSS
before loading (Python, torch and transformers themselves), and compared with the budget.

Usage::

    python benchmarks/policy.py                        # defaults below, ~15 minutes on 2 cores
    python benchmarks/policy.py --repeats 1 --only auto --no-write    # a quick look
    python benchmarks/policy.py --device cuda --device-cap 16GiB      # on the GPU

With ``--device cuda`` the budget still caps RAM (``max_memory`` host), ``--device-cap`` caps the
GPU, and the table adds the GPU's peaks (n/a on the CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import _device
import torch
from _common import (
    describe_policy,
    in_fresh_process,
    peak_rss,
    reset_peak_rss,
    rss,
    write_between_markers,
)
from transformers import OPTConfig

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.assets.toy import OPT_1_3B, build_random_checkpoint
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size
from hf_flexoffload.planning.cost_model import estimate
from hf_flexoffload.planning.hardware import HardwareProfile, default_cache_dir

Q4 = QuantConfig()  # the default: 4 bits, groups of 32 input channels
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "policy.md")
START, END = "<!-- benchmark:policy:start -->", "<!-- benchmark:policy:end -->"


def hand_policies() -> dict[str, Policy]:
    """Diverse fixed policies, each predicted to fit the default budget."""
    on_disk = Split(disk=1.0)
    return {
        "batch 8, weights on disk": Policy(micro_batch_size=8, weights=on_disk),
        "batch 32, weights on disk": Policy(micro_batch_size=32, weights=on_disk),
        "2x16, no overlap": Policy(
            micro_batch_size=16, num_micro_batches=2, weights=on_disk, overlap=False
        ),
        "4x16, half the cache on disk": Policy(
            micro_batch_size=16,
            num_micro_batches=4,
            weights=on_disk,
            cache=Split(device=0.5, disk=0.5),
        ),
        "batch 32, cache+hidden on disk": Policy(
            micro_batch_size=32,
            weights=Split(device=0.1, disk=0.9),
            cache=on_disk,
            activations=on_disk,
        ),
        "batch 32, 4-bit weights half in RAM": Policy(
            micro_batch_size=32, weights=Split(device=0.5, disk=0.5), compress_weights=Q4
        ),
    }


def _measure(path: str, policy: Policy | str, args: argparse.Namespace) -> dict:
    """One load + generate of one block (runs in a fresh process)."""
    device = _device.resolve(args.device)
    _device.cap_memory(device, args.device_cap)
    baseline = rss()
    reset_peak_rss()
    _device.reset_peaks(device)
    workload = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len, max_batch_size=64)
    auto = policy == "auto"
    caps = {"host": args.budget, "device": args.device_cap} if auto else {}
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path,
        offload_policy=policy,
        offload_dir=args.offload_dir,
        device=device,
        dtype=args.dtype,
        max_memory={k: v for k, v in caps.items() if v is not None} or None,
        workload=workload if auto else None,
    ) as model:
        loaded = peak_rss()
        reset_peak_rss()
        chosen = model.offload_policy
        batch = chosen.block_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 50000, (batch, args.prompt_len), generator=g).to(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len)
        _device.synchronize(device)
        wall = time.perf_counter() - start
        stats = model.generation_stats
        peak = peak_rss()
    return {
        "policy": chosen.to_dict(),
        "run_policy": stats.policy.to_dict() if stats.policy else chosen.to_dict(),
        "tokens_per_s": stats.tokens_per_second,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "wall_s": wall,
        "peak_rss_above_baseline": max(loaded, peak) - baseline,
        "peak_rss_load": loaded - baseline,
        "peak_rss_generate": peak - baseline,
        "baseline_rss": baseline,
        **_device.peaks(device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="1750MiB", help="RAM budget (max_memory host)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only policies whose name contains this")
    parser.add_argument("--model-dir", default=os.path.join(default_cache_dir(), "opt-1.3b-bf16"))
    parser.add_argument("--offload-dir", default=os.path.join(default_cache_dir(), "bench-policy"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    _device.add_device_arguments(parser)
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    budget = parse_size(args.budget)

    config = OPTConfig(**OPT_1_3B)
    shape = OPTShape.from_config(config)
    print(f"checkpoint: {args.model_dir} (building it once takes a few minutes)", flush=True)
    build_random_checkpoint(args.model_dir, config, torch.bfloat16)
    os.makedirs(args.offload_dir, exist_ok=True)
    profile = HardwareProfile.measure(
        _device.resolve(args.device),
        args.dtype,
        offload_dir=args.offload_dir,
        matrix=(shape.hidden, shape.ffn),
    )
    print(profile.describe(), flush=True)
    compared: dict[str, Policy | str] = {**hand_policies(), "auto": "auto"}
    if args.only:
        compared = {n: p for n, p in compared.items() if args.only in n}
    workload = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len)

    results: dict[str, list[dict]] = {name: [] for name in compared}
    for repeat in range(args.repeats):
        for name, policy in compared.items():
            out = in_fresh_process(_measure, args.model_dir, policy, args)
            run = Policy.from_dict(out["run_policy"])
            predicted = estimate(shape, args.dtype, profile, workload, run)
            out["predicted"] = predicted.tokens_per_second
            out["predicted_prefill"] = predicted.prefill_seconds
            out["predicted_decode"] = predicted.decode_seconds
            out["predicted_peak"] = predicted.peak_bytes["device"] + predicted.peak_bytes["host"]
            results[name].append(out)
            print(
                f"[{repeat + 1}/{args.repeats}] {name:<36} {out['tokens_per_s']:6.2f} tok/s "
                f"(predicted {out['predicted']:6.2f}; prefill {out['prefill_s']:.1f}s vs "
                f"{out['predicted_prefill']:.1f}s, decode {out['decode_s']:.1f}s vs "
                f"{out['predicted_decode']:.1f}s) "
                f"peak +{human_bytes(out['peak_rss_above_baseline'])}",
                flush=True,
            )
    text = report(results, args, budget, profile)
    print(text)
    if not args.no_write:
        write_between_markers(DOC, START, END, text)
        print(f"wrote {os.path.normpath(DOC)}")


def report(results: dict[str, list[dict]], args, budget: int, profile: HardwareProfile) -> str:
    dtype = str(args.dtype).removeprefix("torch.")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()} "
        f"({profile.device_name}), torch {torch.__version__}, on {args.device}; OPT-1.3B shape, "
        "random bf16 "
        f"checkpoint computed in {dtype}; prompt {args.prompt_len}, {args.gen_len} new tokens; "
        f"RAM budget {human_bytes(budget)}; medians of {args.repeats} alternating repeats, each "
        "run in a fresh process. Placement fractions are device/host/disk percentages; on a "
        "CPU machine device and host are the same RAM.",
        "",
        "| policy | block | placement | measured tok/s | predicted tok/s | error | "
        f"peak RSS above baseline: load / generate | within budget | {_device.PEAK_HEADER} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = max(statistics.median(r["tokens_per_s"] for r in runs) for runs in results.values())
    for name, runs in results.items():
        measured = statistics.median(r["tokens_per_s"] for r in runs)
        predicted = statistics.median(r["predicted"] for r in runs)
        peak = max(r["peak_rss_above_baseline"] for r in runs)
        load = max(r["peak_rss_load"] for r in runs)
        gen = max(r["peak_rss_generate"] for r in runs)
        error = predicted / measured - 1
        lines.append(
            f"| {name} | {Policy.from_dict(runs[0]['run_policy']).block_size} | "
            f"{describe_policy(runs[0]['run_policy'])} | "
            f"{measured:.2f} ({measured / best:.0%} of best) "
            f"| {predicted:.2f} | {error:+.0%} | {human_bytes(load)} / {human_bytes(gen)} | "
            f"{'yes' if peak <= budget else 'NO'} | {' | '.join(_device.peak_cells(runs[-1]))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
