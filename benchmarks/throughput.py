"""Generation throughput side by side: stock transformers, accelerate offloading, and ours.

Every run is one ``generate`` of one batch of the same random prompts in a fresh process:

* **stock**: ``OPTForCausalLM`` with everything in RAM, the compute ceiling (no budget).
* **accelerate**: ``device_map="auto"`` with ``max_memory={"cpu": <weight share>}`` and an
  ``offload_folder``: the rest of the weights on disk, what users run today.
* **ours**: ``FlexOffloadOPTForCausalLM`` with fixed policies (everything resident; weights 25% in
  RAM and 75% on disk, read through the page cache or directly with ``O_DIRECT``) and
  ``offload_policy="auto"`` under the same RAM budget.

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
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from _common import describe_policy, in_fresh_process, write_between_markers
from checkpoints import opt_config, write_random_checkpoint
from transformers import LogitsProcessor, LogitsProcessorList, OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.budget import parse_size
from hf_flexoffload.cost_model import estimate
from hf_flexoffload.hardware import HardwareProfile, default_cache_dir
from hf_flexoffload.stats import human_bytes
from hf_flexoffload.weight_layout import storage_dtype

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
START, END = "<!-- benchmark:throughput:start -->", "<!-- benchmark:throughput:end -->"
PLOT = os.path.join(os.path.dirname(__file__), "..", "docs", "throughput.png")


# -- what runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One system at one batch size in one configuration."""

    config: str  # "resident", "offload" or "cold disk"
    system: str  # row label
    kind: str  # "stock", "accelerate" or "ours"
    batch: int
    policy: dict | str | None = None  # ours: a Policy dict or "auto"
    budget: int | None = None  # peak anonymous RSS allowed above baseline


@dataclass
class Result:
    run: Run
    tokens_per_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    disk_read_per_step: float = 0.0
    weights_read_per_step: float = 0.0
    chosen: dict | None = None
    batch: int = 0  # what ran: the auto policy picks its own block

    @property
    def size(self) -> int:
        return self.batch or self.run.batch

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def fits(self) -> bool:
        return self.run.budget is None or max(self.peak) <= self.run.budget


def _fitting(
    policy: Policy,
    shape: OPTShape,
    profile: HardwareProfile,
    args: argparse.Namespace,
    budget: int,
) -> Policy:
    """``policy`` with as much of the KV cache in RAM as the cost model says fits the budget
    (the rest on disk), in steps of 5%."""
    dtype = getattr(torch, args.compute_dtype)
    workload = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len)
    for percent in range(100, -1, -5):
        in_ram = percent / 100
        candidate = replace(policy, cache=Split(device=in_ram, disk=round(1 - in_ram, 2)))
        storage = storage_dtype(getattr(torch, args.checkpoint_dtype), dtype)
        peak = estimate(shape, dtype, profile, workload, candidate, storage=storage).peak_bytes
        if peak["device"] + peak["host"] <= budget:
            return candidate
    return replace(policy, cache=Split(disk=1.0))


def plan_runs(
    args: argparse.Namespace, profile: HardwareProfile, shape: OPTShape, weight_bytes: int
) -> list[Run]:
    share = int(args.weights_in_ram * weight_bytes)
    budget = share + args.working_memory
    offloaded = Split(device=args.weights_in_ram, disk=1 - args.weights_in_ram)
    runs = []
    for b in args.resident_batches:
        runs.append(Run("resident", "stock transformers", "stock", b))
    for b in args.ours_resident_batches:
        runs.append(Run("resident", "ours, all resident", "ours", b, Policy(micro_batch_size=b)))
    for b in args.offload_batches:
        runs.append(Run("offload", "accelerate device_map", "accelerate", b, None, budget))
    for b in args.ours_batches:
        cached = _fitting(
            Policy(micro_batch_size=b, weights=offloaded, overlap=profile.penalty_for(False) < 1),
            shape,
            profile,
            args,
            budget,
        )
        direct = replace(cached, direct_io=True, overlap=profile.penalty_for(True) < 1)
        runs.append(Run("offload", "ours, fixed split", "ours", b, cached, budget))
        runs.append(Run("cold disk", "ours, O_DIRECT", "ours", b, direct, budget))
    runs.append(Run("offload", "ours, auto", "ours", args.auto_max_batch, "auto", budget))
    if args.only:
        runs = [r for r in runs if args.only in f"{r.config} {r.system}"]
    return [
        Run(**{**r.__dict__, "policy": r.policy.to_dict()}) if isinstance(r.policy, Policy) else r
        for r in runs
    ]


# -- one run, in a fresh process -----------------------------------------------------------------


class _FirstToken(LogitsProcessor):
    """Records when the first logits arrive: the end of the prefill."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class _AnonPeak:
    """Peak anonymous RSS (heap, not page cache or mapped files), sampled in a thread."""

    def __init__(self) -> None:
        self.peak = self.baseline = _anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _anon_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_rss()) - self.baseline


def _anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str, run: Run, args: argparse.Namespace) -> dict:
    """Load, then generate one batch; the whole of it is timed and its memory sampled."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.compute_dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (run.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    first = _FirstToken()
    memory = _AnonPeak()
    offload_dir = os.path.join(args.work_dir, f"offload-{os.getpid()}")
    out: dict = {}
    try:
        if run.kind == "ours":
            model = FlexOffloadOPTForCausalLM.from_pretrained(
                path,
                offload_policy=run.policy if run.policy == "auto" else Policy.from_dict(run.policy),
                offload_dir=offload_dir,
                dtype=dtype,
                # Fixed policies get the budget too: one over it is refused up front.
                max_memory={"host": run.budget} if run.budget else None,
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
                max_memory={"cpu": int(run.budget - args.working_memory)},
                offload_folder=offload_dir,
            )
        else:
            model = OPTForCausalLM.from_pretrained(path, dtype=dtype)
        if run.policy == "auto":  # the block the auto policy planned, not the sweep's size
            b = model.offload_policy.block_size
            ids = torch.randint(3, 50000, (b, args.prompt_len), generator=g)
            mask = torch.ones_like(ids)
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
        wall = time.perf_counter() - start
        out["tokens_per_s"] = ids.shape[0] * args.gen_len / wall
        out["prefill_s"] = first.at - start
        out["decode_s"] = wall - out["prefill_s"]
        out["batch"] = ids.shape[0]
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
    profile: HardwareProfile,
    shape: OPTShape,
    weight_bytes: int,
) -> str:
    best = best_rows(results)
    stock = [r for (c, s), r in best.items() if s == "stock transformers"]
    ceiling = max(stock, key=lambda r: r.median) if stock else None
    accel = best.get(("offload", "accelerate device_map"))
    budget = int(args.weights_in_ram * weight_bytes) + args.working_memory
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {profile.device_name}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; {args.model} shape, random "
        f"{args.checkpoint_dtype} checkpoint computed in {args.compute_dtype}; prompt "
        f"{args.prompt_len}, {args.gen_len} new tokens; medians of {args.repeats} alternating "
        f"repeats, each run in a fresh process. Offload budget: {human_bytes(budget)} of RAM "
        f"({args.weights_in_ram:.0%} of the {human_bytes(weight_bytes)} of weights + "
        f"{human_bytes(args.working_memory)} for the KV cache and activations); accelerate gets "
        f"the weight share as `max_memory`. Roofline: matmul rate "
        f"{profile.matmul_rate(1) / 1e9:.0f}-{max(profile.matmul_flops.values()) / 1e9:.0f} "
        f"GFLOP/s by rows, disk {profile.cached_disk_read / 1e9:.1f} GB/s cached, "
        f"{profile.disk_read / 1e9:.2f} GB/s direct.",
        "",
        "| configuration | system | batch | tokens/s | prefill s | decode s | peak RAM above "
        "baseline | vs stock (same batch) | vs stock best | vs accelerate | roofline tokens/s "
        "| of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock_at = {r.run.batch: r for r in results if r.run.kind == "stock" and r.tokens_per_s}
    for (config, system), r in best.items():
        tps = r.median
        same = stock_at.get(r.size)
        bound_s = roofline_seconds(
            shape, profile, r.size, args.prompt_len, args.gen_len, _read_seconds(r, profile)
        )
        bound = r.size * args.gen_len / bound_s
        auto = r.chosen and r.run.policy == "auto"
        cells = [
            config,
            system + (f" ({describe_policy(r.chosen)})" if auto else ""),
            str(r.size),
            f"{tps:.2f}",
            f"{statistics.median(r.prefill_s):.1f}",
            f"{statistics.median(r.decode_s):.1f}",
            human_bytes(max(r.peak)) + ("" if r.run.budget is None else " (fits)"),
            f"{tps / same.median:.2f}x" if same and r.run.kind != "stock" else "",
            f"{tps / ceiling.median:.2f}x" if ceiling else "",
            f"{tps / accel.median:.2f}x" if accel and r.run.kind == "ours" and r.run.budget else "",
            f"{bound:.2f}",
            f"{tps / bound:.0%}",
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
            f"- {r.run.config}, {r.run.system}, batch {r.size}: "
            + (f"{r.median:.2f}" if r.tokens_per_s else "failed")
            + f" (runs: {', '.join(f'{t:.2f}' for t in r.tokens_per_s)}; peak "
            f"{human_bytes(max(r.peak)) if r.peak else '?'})"
        )
    return "\n".join(lines)


def plot(best: dict[tuple[str, str], Result], path: str) -> None:
    """A bar chart of each row's tokens/s (the PNG beside docs/benchmarks.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c}\n{s} (b{r.size})" for (c, s), r in best.items()]
    values = [r.median for r in best.values()]
    colors = ["#888" if r.run.kind != "ours" else "#d62" for r in best.values()]
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.55 * len(values)))
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s (higher is better)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", help="an OPT shape (see checkpoints.py)")
    parser.add_argument("--checkpoint-dtype", default="bfloat16")
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        help="bf16 matmuls are slow on CPUs without AVX-512 BF16/AMX; use float32 there",
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", default=None, help="runs whose 'configuration system' has this")
    parser.add_argument("--work-dir", default=os.path.join(default_cache_dir(), "bench"))
    parser.add_argument("--checkpoint-dir", default=default_cache_dir())
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    config = opt_config(args.model)
    shape = OPTShape.from_config(config)
    path = os.path.join(args.checkpoint_dir, f"{args.model}-{args.checkpoint_dtype}")
    print(f"checkpoint: {path}", flush=True)
    write_random_checkpoint(path, config, getattr(torch, args.checkpoint_dtype))
    os.makedirs(args.work_dir, exist_ok=True)
    compute = getattr(torch, args.compute_dtype)
    profile = HardwareProfile.measure(
        "cpu", compute, offload_dir=args.work_dir, matrix=(shape.hidden, shape.ffn)
    )
    print(profile.describe(), flush=True)
    with torch.device("meta"):
        weight_bytes = (
            sum(p.numel() for p in OPTForCausalLM(config).parameters()) * compute.itemsize
        )
    runs = plan_runs(args, profile, shape, weight_bytes)
    results = [Result(r) for r in runs]
    for repeat in range(args.repeats):
        for result in results:
            run = result.run
            try:
                out = in_fresh_process(measure, path, run, args)
            except RuntimeError as err:  # e.g. out of memory: report, do not abort the suite
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
            print(
                f"[{repeat + 1}/{args.repeats}] {run.config:<9} {run.system:<24} "
                f"b{out['batch']:<4} {out['tokens_per_s']:7.2f} tok/s (prefill "
                f"{out['prefill_s']:.1f}s, decode {out['decode_s']:.1f}s, peak "
                f"{human_bytes(out['peak'])})",
                flush=True,
            )
    text = report(results, args, profile, shape, weight_bytes)
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
