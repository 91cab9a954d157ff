"""Bigger than RAM: OPT-13B (26 GB in bf16) on a machine with less RAM, ours and accelerate
side by side under the same memory budget, against the roofline.

The checkpoint (``checkpoints.py``, random weights) is the disk tier itself: nothing is copied.
Every run is one ``generate`` in a fresh process inside a memory cgroup of the budget (page
cache included: ``_cgroup.py``), after the page cache is dropped, so the offloaded weights come
from the disk, cold, every step:

* **ours, auto**: ``offload_policy="auto"``, ``max_memory={"host": budget}``, at most
  ``--max-batch`` sequences (the block auto picks within that);
* **ours, fixed**: a FlexGen-style fixed policy for reference: the weights' share that fits the
  budget in RAM, the rest read with ``O_DIRECT``, overlap on;
* **accelerate**: ``device_map="auto"`` with ``max_memory={"cpu": budget - working memory}`` and
  an ``offload_folder``, at each of ``--accelerate-batches``;
* **stock transformers** cannot load the model: its weights alone exceed the machine's RAM (the
  report states the arithmetic; it is not run into the OOM killer).

Reported per run: tokens/s (generated tokens / wall time of ``generate``, FlexGen's metric),
prefill and decode seconds, the peak private (anonymous) RAM above the process's baseline, the
cgroup's peak (everything, page cache included), bytes read from storage per step
(``/proc/self/io``), and for ours the fraction of the roofline: per step the larger of its
FLOPs at the matmul rate measured here (in the run's compute dtype, at that step's rows) and its
weight bytes read at the cold O_DIRECT rate measured on the checkpoint files in the same run.
Each system computes in its best dtype here (``--dtype auto``: ours with ``dtype="auto"``,
accelerate in the dtype whose measured matmul rates are faster for its batch); ``--dtype``
forces one. Rows i of the prompts are the same whatever the batch, so the first generated
tokens of ours and accelerate are compared row by row where they ran the same dtype.

Usage::

    python benchmarks/beyond_ram.py                      # OPT-13B, 4 GiB (about 30 minutes)
    python benchmarks/beyond_ram.py --model opt-tiny --budget 1GiB --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import replace

import _device
import torch
from _cgroup import MemoryCgroup, drop_page_cache
from _common import (
    DTYPE_CHOICES,
    AnonPeak,
    ChildDied,
    dtype_profiles,
    fastest_dtype,
    in_fresh_process,
    write_between_markers,
)
from _roofline import cold_read_rate, matmul_rates
from _throughput_report import roofline_seconds
from checkpoints import opt_config, write_random_checkpoint
from side_by_side import synthetic_ids
from transformers import LogitsProcessorList, OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size
from hf_flexoffload.planning.hardware import HardwareProfile, default_cache_dir
from hf_flexoffload.storage.tier_store import dtype_name

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
START, END = "<!-- benchmark:beyond-ram:start -->", "<!-- benchmark:beyond-ram:end -->"
PLOT = os.path.join(os.path.dirname(__file__), "..", "docs", "beyond_ram.png")
GiB = 2**30


# -- one run, in a fresh process inside the cgroup ----------------------------------------------


def _read_bytes() -> int:
    """Bytes this process has had read from storage (not the page cache)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _load(
    path: str, system: str, batch: int, dtype: str, args: argparse.Namespace, offload_dir: str
):
    if system == "accelerate":
        return OPTForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            device_map="auto",
            max_memory={"cpu": args.budget - args.working_memory},
            offload_folder=offload_dir,
        )
    if system == "ours, auto":
        policy: Policy | str = "auto"
    else:  # the weights' share that fits beside the working memory; the rest read directly
        share = max(0.0, (args.budget - args.working_memory) / args.weight_bytes)
        share = round(min(1.0, share) // 0.01 * 0.01, 2)
        policy = Policy(
            micro_batch_size=batch,
            weights=Split(host=share, disk=round(1 - share, 2)),
            direct_io=True,
        )
    return load_ours(FlexOffloadOPTForCausalLM, path, policy, batch, dtype, args, offload_dir)


def load_ours(cls, path: str, policy, batch: int, dtype: str, args, offload_dir: str):
    """``cls.from_pretrained`` as every run of ours loads: ``policy``, the budget as the host
    cap, the workload at up to ``batch`` sequences."""
    return cls.from_pretrained(
        path,
        offload_policy=policy,
        offload_dir=offload_dir,
        dtype=dtype,
        max_memory={"host": args.budget},
        workload=Workload(prompt_len=args.prompt_len, gen_len=args.gen_len, max_batch_size=batch),
    )


class _FirstRead(_device.FirstToken):
    """Also the bytes read from storage when the first logits exist (the end of the prefill)."""

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.read = _read_bytes()
        return super().__call__(input_ids, scores)


def timed_generate(model, batch: int, args: argparse.Namespace) -> dict:
    """One greedy ``generate`` of ``batch`` synthetic prompts: tokens/s, prefill and decode
    seconds, bytes read from storage in each, and the first generated tokens."""
    ids = synthetic_ids(batch, args.prompt_len, model.config.vocab_size)
    first = _FirstRead(torch.device("cpu"))
    read_before, start = _read_bytes(), time.perf_counter()
    with torch.inference_mode():
        tokens = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.gen_len,
            min_new_tokens=args.gen_len,
            do_sample=False,
            logits_processor=LogitsProcessorList([first]),
        )
    wall, read_after = time.perf_counter() - start, _read_bytes()
    return dict(
        batch=batch,
        tokens_per_s=batch * args.gen_len / wall,
        prefill_s=first.at - start,
        decode_s=wall - (first.at - start),
        read_prefill=first.read - read_before,
        read_decode=read_after - first.read,
        first_tokens=tokens[:, args.prompt_len].tolist(),
    )


def _opt_extras(model, system: str, out: dict, args: argparse.Namespace) -> dict:
    extras = {"read_per_step": (out["read_prefill"] + out["read_decode"]) / args.gen_len}
    if system.startswith("ours"):  # one forward per token
        extras["weights_read_per_step"] = model.placement_report.bytes_per_tier["disk"]
    return extras


def measure(
    path: str,
    system: str,
    batch: int,
    dtype: str,
    args: argparse.Namespace,
    *,
    load=_load,
    extras=_opt_extras,
) -> dict:
    """Load (``load``), then time one ``generate`` of ``batch`` prompts (ours: the block its
    policy has) in ``dtype`` (ours: ``"auto"`` too); ``extras(model, system, out, args)`` adds
    what the benchmark reads off the model after it."""
    torch.set_num_threads(args.threads)
    memory = AnonPeak()
    offload_dir = os.path.join(args.work_dir, f"offload-{os.getpid()}")
    out: dict = {}
    try:
        start = time.perf_counter()
        model = load(path, system, batch, dtype, args, offload_dir)
        out["load_s"] = time.perf_counter() - start
        out["dtype"] = dtype_name(model.dtype)
        if system.startswith("ours"):
            batch = model.offload_policy.block_size
            out["policy"] = model.offload_policy.to_dict()
        out.update(timed_generate(model, batch, args))
        out.update(extras(model, system, out, args))
        if system.startswith("ours"):
            model.close()
    finally:
        out["peak_private"] = memory.stop()
        shutil.rmtree(offload_dir, ignore_errors=True)
    return out


def run(
    path: str,
    system: str,
    batch: int,
    dtype: str,
    args: argparse.Namespace,
    *,
    measure_fn=measure,
    name: str = "beyond-ram",
) -> dict:
    """``measure_fn`` in a fresh process in a new cgroup of the budget, the page cache dropped
    first (or, where no cgroup can be made, with RSS sampling only, said in ``note``)."""
    cgroup, why = MemoryCgroup.make(name, args.budget) if args.cgroup else (None, "off")
    note = drop_page_cache() or ("" if cgroup else f"no cgroup: {why}")
    try:
        out = in_fresh_process(
            measure_fn, path, system, batch, dtype, args, cgroup=cgroup, timeout=args.run_timeout
        )
        out["cgroup_peak"] = cgroup.peak() if cgroup else None
    except (RuntimeError, ChildDied) as err:
        killed = cgroup is not None and cgroup.oom_kills() > 0
        out = {"error": ("killed by the OOM killer: " if killed else "") + str(err)}
    finally:
        if cgroup:
            cgroup.remove()
    out.update(system=system, requested_batch=batch, note=note)
    return out


# -- the roofline ---------------------------------------------------------------------------------


def roofline_fraction(result: dict, shape: OPTShape, profile: HardwareProfile, args) -> float:
    """The roofline time of what ``result`` ran over its measured wall time."""
    read_s = result["weights_read_per_step"] / profile.disk_read
    bound = roofline_seconds(shape, profile, result["batch"], args.prompt_len, args.gen_len, read_s)
    return bound / (result["batch"] * args.gen_len / result["tokens_per_s"])


# -- main -----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of how runs run and where their files go (this and moe.py)."""
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-cgroup", dest="cgroup", action="store_false")
    parser.add_argument("--work-dir", default=os.path.join(default_cache_dir(), "bench"))
    parser.add_argument("--checkpoint-dir", default=default_cache_dir())
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--run-timeout", type=float, default=None, help="seconds after which a run is killed"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-13b", help="an OPT shape (see checkpoints.py)")
    parser.add_argument("--checkpoint-dtype", default="bfloat16")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="compute dtype of every system; auto: each at its fastest here (default)",
    )
    parser.add_argument("--budget", type=parse_size, default=parse_size("4GiB"))
    parser.add_argument(
        "--working-memory",
        type=parse_size,
        default=parse_size("2GiB"),
        help="of the budget, what the fixed policy and accelerate keep for all but the weights",
    )
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=2, help="ours: the most auto may pick")
    parser.add_argument("--fixed-batch", type=int, default=2, help="ours, fixed policy")
    parser.add_argument("--accelerate-batches", type=_ints, default=[2])
    parser.add_argument("--systems", default="ours, auto;ours, fixed;accelerate")
    add_run_arguments(parser)
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--plot", default=PLOT)
    parser.add_argument("--from-json", help="report the runs saved in this beyond_ram.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    from _beyond_ram_report import plot, report

    args = parse_args(argv)
    config = opt_config(args.model)
    shape = OPTShape.from_config(config)
    dtype = getattr(torch, args.checkpoint_dtype)
    path = os.path.join(args.checkpoint_dir, f"{args.model}-{args.checkpoint_dtype}")
    print(f"checkpoint: {path}", flush=True)
    write_random_checkpoint(path, config, dtype)
    os.makedirs(args.work_dir, exist_ok=True)
    with torch.device("meta"):
        numel = sum(p.numel() for p in OPTForCausalLM(config).parameters())
    args.weight_bytes = numel * dtype.itemsize
    shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    profiles = dtype_profiles(
        args.dtype, torch.device("cpu"), args.work_dir, (shape.hidden, shape.ffn)
    )
    sample = min(4 * GiB, args.weight_bytes // 2)
    saved = os.path.join(args.work_dir, "beyond_ram.json")
    if args.from_json:  # report a finished run again (e.g. after a report change)
        with open(args.from_json) as f:
            data = json.load(f)
        results, cold = data["results"], data["cold_reads"]
        for r in results:  # saved before issue 18: computed in the checkpoint's dtype
            r.setdefault("dtype", args.checkpoint_dtype)
    else:
        cold = [cold_read_rate(shards[len(shards) // 2 :], sample)]
        print(f"cold O_DIRECT read of the checkpoint: {cold[0] / 1e9:.2f} GB/s", flush=True)
        results = [run(path, *planned, args) for planned in _plan(args, profiles)]
        for r in results:
            print(_line(r), flush=True)
        # The disk's rate drifts (a virtual disk, a host cache): measured again after the runs.
        cold.append(cold_read_rate(shards[: max(1, len(shards) // 2)], sample))
        print(f"cold O_DIRECT read after the runs: {cold[1] / 1e9:.2f} GB/s", flush=True)
        with open(saved, "w") as f:
            json.dump({"cold_reads": cold, "results": results}, f, indent=1)
    for profile in profiles.values():
        print(profile.describe())
    args.cold_reads = cold
    # The roofline's read rate is the fastest the disk was seen to deliver: either probe, or
    # any system's own decode reads (bytes per step over the decode step time). The stricter
    # the bound, the smaller our fraction of it.
    done = [r for r in results if "error" not in r]
    achieved = [r["read_per_step"] / (r["decode_s"] / max(1, args.gen_len - 1)) for r in done]
    profiles = {n: replace(p, disk_read=max(cold + achieved)) for n, p in profiles.items()}
    ours = [r for r in done if r["system"].startswith("ours")]
    for name in {r["dtype"] for r in ours}:  # in the dtypes they ran, at the blocks they ran
        ran = [r for r in ours if r["dtype"] == name]
        rows = {n for r in ran for n in (r["batch"], r["batch"] * args.prompt_len)}
        rates = matmul_rates(shape, getattr(torch, name), rows)
        profiles[name] = replace(profiles[name], matmul_flops=rates)
    for r in ours:
        r["roofline"] = roofline_fraction(r, shape, profiles[r["dtype"]], args)
        print(f"{r['system']}: {r['roofline']:.0%} of the roofline", flush=True)
    text = report(results, args, profiles, shape, platform.machine())
    print(text)
    if not args.no_write:
        rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.doc)))
        write_between_markers(args.doc, START, END, text + f"\n\n![beyond RAM]({rel})")
        plot(results, args.plot)
        print(f"wrote {os.path.normpath(args.doc)} and {os.path.normpath(args.plot)}")
    return results


def _plan(args: argparse.Namespace, profiles: dict) -> list[tuple[str, int, str]]:
    """(system, batch, compute dtype) of each run: ours' ``--dtype`` (``"auto"`` too), and for
    accelerate the dtype faster here at its batch."""
    systems = args.systems.split(";")
    plan = [(s, args.fixed_batch if s == "ours, fixed" else args.max_batch) for s in systems]
    plan = [(s, b, args.dtype) for s, b in plan if s != "accelerate"]
    if "accelerate" in systems:
        for b in args.accelerate_batches:
            plan.append(
                ("accelerate", b, fastest_dtype(profiles, b, args.prompt_len, args.gen_len))
            )
    return plan


def _line(out: dict) -> str:
    if "error" in out:
        return f"{out['system']} b{out['requested_batch']}: FAILED {out['error']}"
    roof = f", {out['roofline']:.0%} of roofline" if "roofline" in out else ""
    return (
        f"{out['system']} b{out['batch']} {out['dtype']}: {out['tokens_per_s']:.3f} tok/s (prefill "
        f"{out['prefill_s']:.1f}s, decode {out['decode_s']:.1f}s, private peak "
        f"{human_bytes(out['peak_private'])}, read/step {human_bytes(out['read_per_step'])}{roof})"
    )


if __name__ == "__main__":
    main()
