"""Mixture of experts beyond RAM: a Mixtral-shaped model several times the memory budget, ours
and accelerate side by side under that budget, against the roofline (issue 32).

The checkpoint (random weights, Mixtral's architecture: 8 experts, top-2, by default 16 layers
at hidden 2048, expert ffn 5632, about 10 GB in bf16) is written once, tensor by tensor, in the
hub's per-expert names (``block_sparse_moe.experts.E.w1``: what transformers 5's
``save_pretrained`` writes), and is the disk tier itself. Every run is one greedy ``generate``
in a fresh process inside a memory cgroup of the budget (page cache included: ``_cgroup.py``),
after the page cache is dropped, so offloaded weights come from the disk, cold:

* **ours, auto**: ``offload_policy="auto"``, ``max_memory={"host": budget}``,
  ``dtype="auto"`` (``--dtype``), at most ``--max-batch`` sequences (the block auto picks);
* **ours, all experts** and **ours, routed experts**: the policy auto chose with
  ``expert_fetch="all"`` (every expert of a layer prefetched with it every step: the ablation
  that shows what routed-only fetching buys) and ``expert_fetch="routed"`` (only the routed
  experts, after the router, in every step), at auto's batch and dtype;
* **accelerate**: ``MixtralForCausalLM`` with ``device_map="auto"``,
  ``max_memory={"cpu": budget - working memory}`` and an ``offload_folder``, at each of
  ``--accelerate-batches`` in each of ``--accelerate-dtypes`` (a dtype whose offload copy the
  disk has no room for is skipped, and the report says so).

Reported per run: tokens/s (generated tokens / wall time of ``generate``), prefill and decode
seconds, bytes read from storage per decode step (``/proc/self/io``), for ours the routed
experts' bytes per decode step (``generation_stats``) and the ratio of the two, the private
(anonymous) and cgroup peaks, and the fraction of the roofline (``_moe.roofline_seconds``; the
cold ``O_DIRECT`` read rate of the checkpoint files and the matmul rates measured in the same
run). Rows i of the prompts are the same whatever the batch, so first generated tokens are
compared row by row between systems that ran the same dtype.

Usage::

    python benchmarks/moe.py                   # the full size, 2.5 GiB (about an hour)
    python benchmarks/moe.py --layers 2 --hidden 256 --ffn 512 --budget 1GiB --no-write  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace

import beyond_ram
import torch
from _common import DTYPE_CHOICES, dtype_profiles, write_between_markers
from _moe import (
    ABLATION,
    AUTO,
    FETCH,
    ROUTED,
    MoeShape,
    checkpoint_dir_name,
    config_matches,
    mixtral_config,
    mixtral_tensors,
    report,
    roofline_seconds,
    routed_per_step,
)
from _roofline import cold_read_rate, layer_matmul_rates
from beyond_ram import _ints, add_run_arguments, load_ours, run
from checkpoints import write_random_checkpoint
from transformers import MixtralForCausalLM

from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
START, END = "<!-- benchmark:moe:start -->", "<!-- benchmark:moe:end -->"
GiB = 2**30


# -- one run, in a fresh process inside the cgroup ----------------------------------------------


def _load(path: str, system: str, batch: int, dtype: str, args, offload_dir: str):
    if system == "accelerate":
        return MixtralForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            device_map="auto",
            max_memory={"cpu": max(0, args.budget - args.working_memory)},
            offload_folder=offload_dir,
        )
    policy: Policy | str = "auto"
    if system in FETCH:  # auto's choice, fetching experts one way in every step
        policy = replace(Policy.from_dict(args.auto_policy), expert_fetch=FETCH[system])
    return load_ours(AutoFlexOffloadModelForCausalLM, path, policy, batch, dtype, args, offload_dir)


def _accelerate_placement(model) -> tuple[int, int]:
    """(bytes on the disk, all weight bytes) of accelerate's device map, in the model's dtype."""
    where = model.hf_device_map
    disk = total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        owners = [m for m in where if m == "" or name == m or name.startswith(m + ".")]
        total += nbytes
        disk += nbytes if owners and where[max(owners, key=len)] == "disk" else 0
    return disk, total


def _extras(model, system: str, out: dict, args: argparse.Namespace) -> dict:
    """The placement's disk bytes, decode reads per step and, for ours, the bytes moved and
    the routed experts' bytes per decode step."""
    extras = {"read_per_decode_step": out["read_decode"] / max(1, args.gen_len - 1)}
    if system == "accelerate":
        extras["disk_bytes"], extras["weight_bytes"] = _accelerate_placement(model)
        return extras
    placed, stats = model.placement_report, model.generation_stats
    extras.update(
        disk_bytes=placed.bytes_per_tier["disk"],
        weight_bytes=placed.total_bytes,
        bytes_moved=dict(stats.bytes_moved),
    )
    extras["routed_per_step"] = routed_per_step(
        getattr(stats, "routed_expert_bytes", None),
        args.shape,
        placed.total_bytes / args.shape.params,
        out["batch"],
        args.prompt_len,
        args.gen_len,
    )
    return extras


def measure(path: str, system: str, batch: int, dtype: str, args: argparse.Namespace) -> dict:
    """``beyond_ram.measure`` with this benchmark's models and what it reads off them."""
    return beyond_ram.measure(path, system, batch, dtype, args, load=_load, extras=_extras)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_argument_group("the Mixtral shape")
    for flag, default in [("layers", 16), ("hidden", 2048), ("ffn", 5632), ("heads", 16)]:
        size.add_argument(f"--{flag}", type=int, default=default)
    size.add_argument("--kv-heads", type=int, default=8)
    size.add_argument("--vocab", type=int, default=32000)
    size.add_argument("--experts", type=int, default=8)
    size.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--checkpoint-dtype", default="bfloat16")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="ours' compute dtype (default auto)"
    )
    parser.add_argument(
        "--accelerate-dtypes",
        type=lambda text: text.split(","),
        default=["bfloat16", "float32"],
        help="accelerate's compute dtypes (comma-separated; default bfloat16,float32)",
    )
    parser.add_argument("--budget", type=parse_size, default=parse_size("2.5GiB"))
    parser.add_argument(
        "--working-memory",
        type=parse_size,
        default=parse_size("1GiB"),
        help="of the budget, what accelerate keeps for all but its RAM-resident weights",
    )
    parser.add_argument("--prompt", dest="prompt_len", type=int, default=64)
    parser.add_argument("--new", dest="gen_len", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8, help="ours: the most auto may pick")
    parser.add_argument("--accelerate-batches", type=_ints, default=[8])
    parser.add_argument("--systems", default=f"{AUTO};{ABLATION};{ROUTED};accelerate")
    add_run_arguments(parser)
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--from-json", help="report the runs saved in this moe.json again")
    return parser.parse_args(argv)


def checkpoint(args: argparse.Namespace) -> str:
    """The random checkpoint of ``args``' shape, written once (reused where it matches)."""
    config = mixtral_config(args)
    path = os.path.join(args.checkpoint_dir, checkpoint_dir_name(config, args.checkpoint_dtype))
    if os.path.exists(os.path.join(path, "config.json")) and not config_matches(path, config):
        raise SystemExit(f"{path} holds another Mixtral shape: remove it or pick --checkpoint-dir")
    print(f"checkpoint: {path}", flush=True)
    dtype = getattr(torch, args.checkpoint_dtype)
    return write_random_checkpoint(path, config, dtype, tensors=mixtral_tensors(config))


def _run(path: str, system: str, batch: int, dtype: str, args: argparse.Namespace) -> dict:
    out = run(path, system, batch, dtype, args, measure_fn=measure, name="moe")
    print(_line(out), flush=True)
    return out


def runs(path: str, args: argparse.Namespace) -> list[dict]:
    """Every planned run in turn: ours auto, its ablation (auto's policy, batch and dtype), and
    accelerate at each batch and dtype the disk has room for."""
    systems, results = args.systems.split(";"), []
    ablations = [s for s in systems if s in FETCH]
    if AUTO in systems or ablations:
        auto = _run(path, AUTO, args.max_batch, args.dtype, args)
        results += [auto] if AUTO in systems else []
        for ablation in ablations:
            if "error" in auto:
                args.skipped.append(f"{ablation} not run: {AUTO} failed, so no policy to ablate")
                continue
            args.auto_policy = auto["policy"]
            results.append(_run(path, ablation, auto["batch"], auto["dtype"], args))
    if "accelerate" in systems:
        free = shutil.disk_usage(args.work_dir).free
        for dtype in args.accelerate_dtypes:
            need = args.shape.params * getattr(torch, dtype).itemsize
            if free < need + GiB:  # its offload folder may hold a copy of all the weights
                args.skipped.append(
                    f"accelerate {dtype} not run: its offload copy may need {human_bytes(need)}, "
                    f"the disk has {human_bytes(free)} free"
                )
                continue
            results += [_run(path, "accelerate", b, dtype, args) for b in args.accelerate_batches]
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the roofline's matmul rates: as the runs compute
    args.shape = shape = MoeShape.from_config(mixtral_config(args))
    itemsize = getattr(torch, args.checkpoint_dtype).itemsize
    args.weight_bytes = shape.params * itemsize
    args.expert_bytes = shape.layers * shape.experts * shape.expert_params * itemsize
    args.skipped = []
    path = checkpoint(args)
    os.makedirs(args.work_dir, exist_ok=True)
    shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    sample = min(4 * GiB, args.weight_bytes // 2)
    saved = os.path.join(args.work_dir, "moe.json")
    if args.from_json:  # report a finished run again (e.g. after a report change)
        with open(args.from_json) as f:
            data = json.load(f)
        results, args.cold_reads, args.skipped = (
            data[k] for k in ("results", "cold_reads", "skipped")
        )
    else:
        if any(s.startswith("ours") for s in args.systems.split(";")):  # ours finds them cached
            for profile in dtype_profiles(
                args.dtype, torch.device("cpu"), args.work_dir, (shape.hidden, shape.ffn)
            ).values():
                print(profile.describe(), flush=True)
        args.cold_reads = [cold_read_rate(shards[len(shards) // 2 :], sample)]
        print(f"cold O_DIRECT read of the checkpoint: {args.cold_reads[0] / 1e9:.2f} GB/s")
        results = runs(path, args)
        args.cold_reads.append(cold_read_rate(shards[: max(1, len(shards) // 2)], sample))
        print(f"cold O_DIRECT read after the runs: {args.cold_reads[1] / 1e9:.2f} GB/s")
        with open(saved, "w") as f:
            json.dump(
                {"cold_reads": args.cold_reads, "results": results, "skipped": args.skipped},
                f,
                indent=1,
            )
    done = [r for r in results if "error" not in r]
    steps = max(1, args.gen_len - 1)
    achieved = [r["read_per_decode_step"] / (r["decode_s"] / steps) for r in done]
    args.disk_rate = max(args.cold_reads + achieved)
    rates: dict[str, dict[int, float]] = {}
    head: dict[str, dict[int, float]] = {}
    for name in {r["dtype"] for r in done}:  # in the dtypes they ran, at the rows they ran
        ran = [r for r in done if r["dtype"] == name]
        rows = {n for r in ran for n in (r["batch"], r["batch"] * args.prompt_len)}
        rates[name] = layer_matmul_rates(shape.matrices(), getattr(torch, name), rows)
        batches = {r["batch"] for r in ran}
        head[name] = layer_matmul_rates(
            [(shape.vocab, shape.hidden)], getattr(torch, name), batches
        )
    for r in done:
        bound = roofline_seconds(
            r, shape, rates[r["dtype"]], head[r["dtype"]][r["batch"]], args.disk_rate, args
        )
        r["roofline"] = bound / (r["batch"] * args.gen_len / r["tokens_per_s"])
    text = report(results, args, shape, rates)
    print(text)
    if not args.no_write:
        write_between_markers(args.doc, START, END, text)
        print(f"wrote {os.path.normpath(args.doc)}")
    return results


def _line(out: dict) -> str:
    if "error" in out:
        return f"{out['system']} b{out['requested_batch']}: FAILED {out['error']}"
    routed = out.get("routed_per_step")
    routed = f", routed/step {human_bytes(routed)}" if routed is not None else ""
    if "bytes_moved" in out:
        routed += f", disk->host {human_bytes(out['bytes_moved'].get('disk_to_host', 0))} in all"
    return (
        f"{out['system']} b{out['batch']} {out['dtype']}: {out['tokens_per_s']:.3f} tok/s (prefill "
        f"{out['prefill_s']:.1f}s, decode {out['decode_s']:.1f}s, private peak "
        f"{human_bytes(out['peak_private'])}, read/decode step "
        f"{human_bytes(out['read_per_decode_step'])}{routed})"
    )


if __name__ == "__main__":
    main()
