"""The throughput suite's report: the roofline bound of each row, the table, the plot.

Split from throughput.py (which runs the suite); ``report`` reads only the results, the
arguments, the profiles (one per compute dtype) and the shape.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import TYPE_CHECKING

import _device
import torch
from _common import describe_policy, dtype_sentence, tokens_bar_chart

from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.hardware import HardwareProfile

if TYPE_CHECKING:
    from _throughput_plan import Result

# -- roofline ------------------------------------------------------------------------------------


def roofline_seconds(
    shape: OPTShape,
    profile: HardwareProfile,
    batch: int,
    prompt_len: int,
    gen_len: int,
    read_seconds: float,
) -> float:
    """The time of the workload with compute at the measured matmul rate and ``read_seconds``
    of disk reads per step, each step's reads fully hidden under its compute (or the reverse)."""
    h, f, v = shape.hidden, shape.ffn, shape.vocab

    def step(rows: int, context: float, heads_rows: int) -> float:
        layer = 2 * (4 * h * h + 2 * h * f) + 4 * h * context  # per token: matmuls + attention
        flops = rows * shape.layers * layer + heads_rows * 2 * h * v
        compute = flops / profile.matmul_rate(rows)
        return max(compute, read_seconds)

    total = step(batch * prompt_len, prompt_len / 2, batch)  # the head runs on the last position
    for t in range(1, gen_len):
        total += step(batch, prompt_len + t, batch)
    return total


def _read_seconds(r: Result, profile: HardwareProfile) -> float:
    """Disk time per step at the measured rates: weights read directly (O_DIRECT) at the cold
    rate, everything else (and cached weights) at the page-cache rate."""
    policy = r.chosen or (r.run.policy if isinstance(r.run.policy, dict) else None)
    direct = bool(policy and policy.get("direct_io"))
    weights = r.weights_read_per_step
    rest = max(0.0, r.disk_read_per_step - weights)
    weights_rate = profile.disk_read if direct else profile.cached_disk_read
    return weights / weights_rate + rest / profile.cached_disk_read


# -- report --------------------------------------------------------------------------------------


def best_rows(results: list[Result]) -> dict[tuple[str, str], Result]:
    """Each (configuration, system)'s best batch among those that fit its budget."""
    best: dict[tuple[str, str], Result] = {}
    for r in results:
        key = (r.run.config, r.run.system)
        ok = r.fits and r.tokens_per_s
        if ok and (key not in best or r.median > best[key].median):
            best[key] = r
    return best


def report(
    results: list[Result],
    args: argparse.Namespace,
    profiles: dict[str, HardwareProfile],
    shape: OPTShape,
    weight_bytes: int,
) -> str:
    best = best_rows(results)
    profile = next(iter(profiles.values()))  # the disk rates: the same in every dtype's
    widest = max(profiles, key=lambda name: getattr(torch, name).itemsize)  # as throughput.py
    stock = [r for (c, s), r in best.items() if s == "stock transformers"]
    ceiling = max(stock, key=lambda r: r.median) if stock else None
    accel = best.get(("offload", "accelerate device_map"))
    budget = int(args.weights_in_ram * weight_bytes) + args.working_memory
    on_gpu = _device.is_cuda(torch.device(args.device))
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {profile.device_name}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; {args.model} shape, random "
        f"{args.checkpoint_dtype} checkpoint. {dtype_sentence(args.dtype)} Prompt "
        f"{args.prompt_len}, {args.gen_len} new tokens; medians of {args.repeats} alternating "
        f"repeats, each run in a fresh process. Offload budget: {human_bytes(budget)} of RAM "
        f"({args.weights_in_ram:.0%} of the {human_bytes(weight_bytes)} of weights in {widest} + "
        f"{human_bytes(args.working_memory)} for the KV cache and activations); accelerate gets "
        f"the weight share as `max_memory`. Roofline: matmul rate (in the row's dtype) "
        + ", ".join(
            f"{name} {p.matmul_rate(1) / 1e9:.0f}-{max(p.matmul_flops.values()) / 1e9:.0f}"
            for name, p in profiles.items()
        )
        + f" GFLOP/s by rows, disk {profile.cached_disk_read / 1e9:.1f} GB/s cached, "
        f"{profile.disk_read / 1e9:.2f} GB/s direct."
        + (
            f" Every system on {args.device}, GPU cap {_device.fmt(args.device_cap)}."
            if on_gpu
            else ""
        )
        + f" {getattr(args, 'cap_note', '')}",
        "",
        "| configuration | system | batch | dtype | tokens/s | prefill s | decode s | peak RAM "
        "above baseline | vs stock (same batch) | vs stock best | vs accelerate | roofline "
        f"tokens/s | of roofline | {_device.PEAK_HEADER} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock_at = {r.run.batch: r for r in results if r.run.kind == "stock" and r.tokens_per_s}
    for (config, system), r in best.items():
        tps = r.median
        same = stock_at.get(r.size)
        ran = profiles.get(r.dtype, profile)  # each row's bound in its own dtype
        bound_s = roofline_seconds(
            shape, ran, r.size, args.prompt_len, args.gen_len, _read_seconds(r, ran)
        )
        bound = r.size * args.gen_len / bound_s
        auto = r.chosen and r.run.policy == "auto"
        cells = [
            config,
            system + (f" ({describe_policy(r.chosen)})" if auto else ""),
            str(r.size),
            r.dtype,
            f"{tps:.2f}",
            f"{statistics.median(r.prefill_s):.1f}",
            f"{statistics.median(r.decode_s):.1f}",
            human_bytes(max(r.peak))
            + ("" if r.run.budget is None else " (fits)")
            + (f"; cgroup {human_bytes(max(r.cgroup_peak))}" if r.cgroup_peak else ""),
            f"{tps / same.median:.2f}x" if same and r.run.kind != "stock" else "",
            f"{tps / ceiling.median:.2f}x" if ceiling else "",
            f"{tps / accel.median:.2f}x" if accel and r.run.kind == "ours" and r.run.budget else "",
            f"{bound:.2f}",
            f"{tps / bound:.0%}",
            *_device.peak_cells(r.device_peaks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    over = [r for r in results if not r.fits]
    if over:
        lines += [
            "",
            "Over the budget (not eligible): "
            + "; ".join(
                f"{r.run.system} at batch {r.run.batch}: {max(r.peak) / 2**20:.0f} MiB for a "
                f"budget of {r.run.budget / 2**20:.0f} MiB, {r.median:.2f} tok/s"
                for r in over
            )
            + ".",
        ]
    lines += ["", "All runs (median tokens/s by batch):", ""]
    for r in results:
        lines.append(
            f"- {r.run.config}, {r.run.system}, batch {r.size}, {r.dtype or r.run.dtype}: "
            + (f"{r.median:.2f}" if r.tokens_per_s else "failed")
            + f" (runs: {', '.join(f'{t:.2f}' for t in r.tokens_per_s)}; peak "
            f"{human_bytes(max(r.peak)) if r.peak else '?'})"
            + "".join(f"; failed: {e}" for e in sorted(set(r.errors)))
        )
    return "\n".join(lines)


def plot(best: dict[tuple[str, str], Result], path: str) -> None:
    """A bar chart of each row's tokens/s (the PNG beside docs/benchmarks.md)."""
    labels = [f"{c}\n{s} (b{r.size}, {r.dtype})" for (c, s), r in best.items()]
    values = [r.median for r in best.values()]
    tokens_bar_chart(labels, values, [r.run.kind == "ours" for r in best.values()], path)
