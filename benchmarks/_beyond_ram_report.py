"""beyond_ram.py's report: the table (markdown for docs/benchmarks.md) and the plot."""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import describe_policy, dtype_sentence, tokens_bar_chart

from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.hardware import HardwareProfile


def _mem_total() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _agreement(results: list[dict]) -> str:
    """Row-by-row agreement of the first generated token between ours and accelerate, where
    they computed in the same dtype (another dtype rounds differently: no token equality)."""
    ours = [r for r in results if r["system"].startswith("ours") and "first_tokens" in r]
    accel = [r for r in results if r["system"] == "accelerate" and "first_tokens" in r]
    if not ours or not accel:
        return "First tokens: not compared (ours or accelerate did not finish)."
    parts = []
    for o in ours:
        for a in accel:
            if o["dtype"] != a["dtype"]:
                parts.append(
                    f"{o['system']} ({o['dtype']}) vs accelerate b{a['batch']} ({a['dtype']}): "
                    "not compared, other dtypes"
                )
                continue
            n = min(len(o["first_tokens"]), len(a["first_tokens"]))
            pairs = zip(o["first_tokens"][:n], a["first_tokens"][:n], strict=True)
            same = sum(x == y for x, y in pairs)
            parts.append(f"{o['system']} vs accelerate b{a['batch']}: {same}/{n} prompts equal")
    return (
        "First generated token, row by row, where both ran the same dtype: "
        + "; ".join(parts)
        + "."
    )


def report(
    results: list[dict],
    args: argparse.Namespace,
    profiles: dict[str, HardwareProfile],
    shape: OPTShape,
    machine: str,
) -> str:
    profile = next(iter(profiles.values()))  # the disk rates: the same in every dtype's
    total = _mem_total()
    ok = [r for r in results if "error" not in r]
    accel = [r["tokens_per_s"] for r in ok if r["system"] == "accelerate"]
    best_accel = max(accel) if accel else None
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}, {profile.device_name}, "
        f"{os.cpu_count()} cores, {human_bytes(total)} RAM, torch {torch.__version__}. "
        f"{args.model} shape ({shape.layers} layers, hidden {shape.hidden}), random "
        f"{args.checkpoint_dtype} safetensors checkpoint of {human_bytes(args.weight_bytes)} of "
        f"weights. {dtype_sentence(args.dtype)} Prompt {args.prompt_len}, {args.gen_len} new "
        "tokens, one "
        f"run per row, each in a fresh process inside a memory cgroup of the process's baseline "
        f"+ {human_bytes(args.budget)} (page cache counted), the page cache dropped first.",
        "",
        f"Stock transformers is not run: its {args.checkpoint_dtype} weights alone "
        f"({human_bytes(args.weight_bytes)}) exceed this machine's {human_bytes(total)} of RAM, "
        f"let alone the {human_bytes(args.budget)} budget.",
        "",
        "Roofline (ours): per step, the larger of its FLOPs at the matmul rate of its compute "
        f"dtype measured here for that step's rows ({_rates(profiles)} GFLOP/s by rows) and its "
        f"disk-tier weight bytes at {profile.disk_read / 1e9:.2f} GB/s: the fastest the disk was "
        f"seen to read, of two cold O_DIRECT probes of the checkpoint (64 MiB reads, 4 in flight, "
        f"4 GiB before and after the runs: "
        f"{' and '.join(f'{c / 1e9:.2f}' for c in args.cold_reads)} GB/s) and every system's "
        "own decode reads (the disk drifts between runs here; the fastest is the strictest "
        "bound). "
        "Decode reads: bytes read from storage per step over the mean decode step time.",
        "",
        "| system | batch | dtype | tokens/s | vs accelerate | prefill s | decode s | private "
        "peak | cgroup peak | read/step | decode reads | roofline | policy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['system']} | {r['requested_batch']} | | failed: {r['error'][:160]} "
                "| | | | | | | | | |"
            )
            continue
        ratio = f"{r['tokens_per_s'] / best_accel:.2f}x" if best_accel else "n/a"
        cgroup = human_bytes(r["cgroup_peak"]) if r.get("cgroup_peak") else "n/a"
        roof = f"{r['roofline']:.0%}" if "roofline" in r else ""
        step_s = r["decode_s"] / max(1, args.gen_len - 1)
        rate = f"{r['read_per_step'] / step_s / 1e9:.2f} GB/s"
        policy = describe_policy(r["policy"]) if r.get("policy") else "device_map auto"
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['dtype']} | {r['tokens_per_s']:.4f} | {ratio} | "
            f"{r['prefill_s']:.1f} | {r['decode_s']:.1f} | {human_bytes(r['peak_private'])} | "
            f"{cgroup} | {human_bytes(r['read_per_step'])} | {rate} | {roof} | {policy} |"
        )
    notes = sorted({r["note"] for r in results if r.get("note")})
    lines += ["", _agreement(results)] + [f"Note: {n}." for n in notes]
    return "\n".join(lines)


def _rates(profiles: dict[str, HardwareProfile]) -> str:
    return "; ".join(
        f"{name} {{" + ", ".join(f"{r}: {f / 1e9:.0f}" for r, f in p.matmul_flops.items()) + "}"
        for name, p in profiles.items()
    )


def plot(results: list[dict], path: str) -> None:
    """tokens/s per finished run (the PNG beside docs/benchmarks.md)."""
    ok = [r for r in results if "error" not in r]
    if ok:
        labels = [f"{r['system']} (b{r['batch']}, {r['dtype']})" for r in ok]
        values = [r["tokens_per_s"] for r in ok]
        ours = [r["system"].startswith("ours") for r in ok]
        tokens_bar_chart(labels, values, ours, path, digits=4)
