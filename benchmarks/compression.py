"""Compressed vs uncompressed weights under one memory budget, on the OPT-1.3B shape.

Builds (once) a random bf16 OPT-1.3B checkpoint, then in one process, alternating repeats:

* ``plain``: bf16 weights; the budget holds what it can, the rest is on disk;
* ``4bit``: 4-bit weights in FlexGen's exact setting (groups of 64 output channels, min-max;
  not the library's default, ``QuantConfig()``), the same policy otherwise, all within the
  budget;
* ``plain, all in RAM``: bf16 weights, ignoring the budget: the reference for the cost of
  dequantizing (``4bit`` minus this is what compression costs when nothing is read from disk).

It also times dequantizing one decoder layer's matrices on their own. Results (medians) are
written between markers in ``docs/compression.md`` and ``docs/benchmarks.md``.

Usage::

    python benchmarks/compression.py                      # defaults below, ~10 minutes on 2 cores
    python benchmarks/compression.py --repeats 1 --gen-len 4 --no-write   # a quick look
    python benchmarks/compression.py --device cuda --dtype bfloat16         # on the GPU

On CUDA the budget is the GPU's (``--budget`` becomes ``--device-cap`` unless that is given) and
the table adds the GPU's peaks (n/a on the CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import _device
import torch
from _common import in_fresh_process, peak_rss, write_between_markers
from transformers import OPTConfig

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig, Split
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.budget import parse_size
from hf_flexoffload.compression import dequantize, quantize
from hf_flexoffload.hardware import default_cache_dir
from hf_flexoffload.stats import human_bytes
from hf_flexoffload.toy import OPT_1_3B, build_random_checkpoint
from hf_flexoffload.weight_layout import layout_for, placement_report

# FlexGen's setting, which this benchmark compares with FlexGen's own claims and which its
# recorded numbers (docs/compression.md) used; the library's default is QuantConfig().
Q4 = QuantConfig(bits=4, group_size=64, dim=0, rounding="minmax")
DOCS = [
    os.path.join(os.path.dirname(__file__), "..", "docs", name)
    for name in ("compression.md", "benchmarks.md")
]
START, END = "<!-- benchmark:compression:start -->", "<!-- benchmark:compression:end -->"


def policies(config: OPTConfig, budget: int, batch: int, dtype: torch.dtype) -> dict[str, Policy]:
    """The compared policies; the plain one puts on disk what the budget cannot hold."""
    shape = OPTShape.from_config(config)
    plain = placement_report(layout_for(shape, Policy(), dtype), Split(device=1.0))
    packed = placement_report(
        layout_for(shape, Policy(compress_weights=Q4), dtype), Split(device=1.0)
    )
    # Keep a quarter of the budget for the two staged layers, the KV cache and activations.
    room = 0.75 * budget
    if packed.total_bytes > room:
        sys.exit(f"A budget of {human_bytes(budget)} cannot hold even the 4-bit weights.")
    resident = round(min(1.0, room / plain.total_bytes), 3)
    common = dict(micro_batch_size=batch // 2, num_micro_batches=2, cache=Split(device=1.0))
    return {
        "plain": Policy(weights=Split(device=resident, disk=round(1 - resident, 3)), **common),
        "4bit": Policy(weights=Split(device=1.0), compress_weights=Q4, **common),
        "plain, all in RAM": Policy(weights=Split(device=1.0), **common),
    }


def _measure(path: str, policy: Policy, offload_dir: str, args) -> dict:
    """One load + generate, in a fresh process so its peak RSS is its own."""
    device = _device.resolve(args.device)
    _device.cap_memory(device, args.device_cap)
    _device.reset_peaks(device)
    torch.manual_seed(0)
    ids = torch.randint(3, 50000, (args.batch, args.prompt_len)).to(device)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, offload_dir=offload_dir, device=device, dtype=args.dtype
    ) as model:
        report = model.placement_report
        loaded = peak_rss()
        model.generate(ids, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len)
        stats = model.generation_stats
        peak = peak_rss()
    decode_tokens = args.batch * (args.gen_len - 1)
    return {
        "tokens_per_s": stats.tokens_per_second,
        "prefill_s": stats.prefill_seconds,
        "decode_s_per_step": stats.decode_seconds / (args.gen_len - 1),
        "decode_ms_per_token": 1000 * stats.decode_seconds / decode_tokens,
        "disk_read_per_forward": stats.bytes_moved.get("disk_to_host", 0) / stats.forwards,
        "peak_rss_load": loaded,
        "peak_rss": peak,
        "resident": report.bytes_per_tier["device"],
        "disk": report.bytes_per_tier["disk"],
        **_device.peaks(device),
    }


def dequant_per_layer(
    config: OPTConfig, dtype: torch.dtype, repeats: int, device: torch.device
) -> float:
    """Seconds to dequantize one decoder layer's matrices (``Q4``) on ``device``, median."""
    h, f = config.hidden_size, config.ffn_dim
    shapes = [(h, h)] * 4 + [(f, h), (h, f)]
    packed = [quantize(torch.randn(s, dtype=dtype, device=device), Q4) for s in shapes]
    outs = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    times = []
    for _ in range(repeats):
        _device.synchronize(device)
        start = time.perf_counter()
        for q, out in zip(packed, outs, strict=True):
            dequantize(q, out=out)
        _device.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="2GiB", help="RAM for weights, cache, activations")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype (float32: CPUs without AVX-512 BF16 run bf16 matmuls far slower)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", default=os.path.join(default_cache_dir(), "opt-1.3b-bf16"))
    parser.add_argument("--offload-dir", default=os.path.join(default_cache_dir(), "bench-offload"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    _device.add_device_arguments(parser)
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    device = _device.resolve(args.device)
    if _device.is_cuda(device) and args.device_cap is None:
        args.device_cap = parse_size(args.budget)  # the budget is the GPU's there

    config = OPTConfig(**OPT_1_3B)
    print(f"checkpoint: {args.model_dir} (building it once takes a few minutes)", flush=True)
    build_random_checkpoint(args.model_dir, config, torch.bfloat16)
    budget = parse_size(args.budget)
    compared = policies(config, budget, args.batch, args.dtype)
    results: dict[str, list[dict]] = {name: [] for name in compared}
    for repeat in range(args.repeats):
        for name, policy in compared.items():
            slug = "".join(c if c.isalnum() else "-" for c in name)
            out = in_fresh_process(
                _measure, args.model_dir, policy, os.path.join(args.offload_dir, slug), args
            )
            results[name].append(out)
            print(f"[{repeat + 1}/{args.repeats}] {name:<18} {out['tokens_per_s']:6.2f} tok/s")
    dequant = dequant_per_layer(config, args.dtype, repeats=5, device=device)

    dtype_name = str(args.dtype).removeprefix("torch.")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; OPT-1.3B shape, random bf16 "
        f"checkpoint computed in {dtype_name} on {args.device}; batch {args.batch} "
        "(2 micro-batches), prompt "
        f"{args.prompt_len}, {args.gen_len} new tokens; budget {args.budget}; medians of "
        f"{args.repeats} alternating repeats, each run in a fresh process (peak RSS is the whole "
        "process's, Python and torch included, at the end of loading and of generating).",
        "",
        "| weights | resident | disk | read from disk per forward | peak RSS: load | "
        "peak RSS: generate | prefill s | decode s/step | tokens/s | vs plain | "
        f"{_device.PEAK_HEADER} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = statistics.median(r["tokens_per_s"] for r in results["plain"])
    for name, runs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        lines.append(
            f"| {name} | {human_bytes(runs[0]['resident'])} | {human_bytes(runs[0]['disk'])} | "
            f"{human_bytes(statistics.median(r['disk_read_per_forward'] for r in runs))} | "
            f"{human_bytes(max(r['peak_rss_load'] for r in runs))} | "
            f"{human_bytes(max(r['peak_rss'] for r in runs))} | "
            f"{statistics.median(r['prefill_s'] for r in runs):.2f} | "
            f"{statistics.median(r['decode_s_per_step'] for r in runs):.2f} | "
            f"{tps:.2f} | {tps / base:.2f}x | {' | '.join(_device.peak_cells(runs[-1]))} |"
        )
    per_token = [
        statistics.median(r["decode_ms_per_token"] for r in results[name])
        for name in ("4bit", "plain, all in RAM")
    ]
    layers = config.num_hidden_layers
    lines += [
        "",
        f"Dequantizing one decoder layer's matrices: {1000 * dequant:.0f} ms "
        f"({1000 * dequant * layers:.0f} ms for the {layers} layers of a forward, "
        f"{1000 * dequant * layers / args.batch:.1f} ms per sequence-token at batch "
        f"{args.batch}).",
        f"Decode cost per generated token, both in RAM: 4-bit {per_token[0]:.1f} ms, plain "
        f"{per_token[1]:.1f} ms: dequantization adds {per_token[0] - per_token[1]:.1f} ms.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        for doc in DOCS:
            write_between_markers(doc, START, END, text)
            print(f"wrote {os.path.normpath(doc)}")


if __name__ == "__main__":
    main()
