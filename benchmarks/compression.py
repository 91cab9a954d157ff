"""4-bit weights against plain ones, where bytes are the bottleneck: on the OPT-1.3B shape.

Two scenarios, each system run in a fresh process, all in one invocation (side by side):

* **capped**: a real memory cap. Each run is inside a memory cgroup of ``--budget`` above the
  process's baseline, page cache counted, after the page cache is dropped: ``plain`` keeps the
  share of its weights the budget holds and reads the rest from disk every forward (``O_DIRECT``,
  cold), ``4-bit`` keeps all its weights within the same budget. At each of ``--batches``.
* **resident**: everything in RAM, batch 1 (latency-bound decode): ``plain`` in each
  ``--dtypes`` compute dtype, against ``4-bit`` weights multiplied by the int4 kernel where it
  was measured to win (``int4_kernel_rows`` measured at load) and ``4-bit, dequantizing`` (the
  kernel off: the path every device has).

4-bit weights use the default ``QuantConfig()``. The first generated tokens of each 4-bit run are
compared with the plain run's of the same scenario (they may differ: 4-bit weights are another
model). Results are written between markers in ``docs/compression.md`` and
``docs/benchmarks.md``; ``--from-json`` reports a saved run again.

Usage::

    python benchmarks/compression.py                   # both scenarios, ~20 minutes on 2 cores
    python benchmarks/compression.py --scenarios resident --no-write   # a quick look
    python benchmarks/compression.py --shape opt-125m --batches 2 --budget 600MiB --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace

import torch
from _cgroup import run_in_cgroup
from _common import dtype_profiles, in_fresh_process, peak_rss, write_between_markers
from checkpoints import opt_config, write_random_checkpoint

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig, Split, Workload
from hf_flexoffload.architectures.opt import OPTShape
from hf_flexoffload.config.counters import human_bytes
from hf_flexoffload.planning.budget import parse_size
from hf_flexoffload.planning.hardware import default_cache_dir
from hf_flexoffload.planning.memory_model import footprint
from hf_flexoffload.planning.probes import cpu_name

DOCS = [
    os.path.join(os.path.dirname(__file__), "..", "docs", name)
    for name in ("compression.md", "benchmarks.md")
]
START, END = "<!-- benchmark:compression:start -->", "<!-- benchmark:compression:end -->"
Q4 = QuantConfig()
CPU = torch.device("cpu")
# Of the budget, what the memory model's footprint may take: the rest is the interpreter's growth
# and the allocator's slack, which the model does not count.
FOOTPRINT_SHARE = 0.95


def resident_share(shape: OPTShape, policy: Policy, budget: int, batch: int, dtypes, args) -> float:
    """The largest share of ``policy``'s weights (to 0.01) that keeps the memory model's
    footprint of ``batch`` sequences within ``FOOTPRINT_SHARE`` of ``budget`` in every one of
    ``dtypes``, the rest on disk; 0 when even none fits."""
    work = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=batch)

    def fits(share: float) -> bool:
        split = Split(device=share, disk=round(1 - share, 2))
        placed = replace(policy, weights=split, micro_batch_size=batch)
        return all(
            footprint(shape, d, placed, work, shared=True, storage=torch.bfloat16)[0].memory
            <= FOOTPRINT_SHARE * budget
            for d in dtypes
        )

    return max((s / 100 for s in range(101) if fits(s / 100)), default=0.0)


def capped_runs(shape: OPTShape, budget: int, batch: int, dtype: str, args) -> dict[str, dict]:
    """The capped scenario's runs at one batch: plain with as much of its (bf16) weights
    resident as the budget holds at this batch, whichever dtype it computes in, the rest read
    from disk with O_DIRECT; 4-bit with all of its weights resident."""
    dtypes = [torch.float32, torch.bfloat16] if dtype == "auto" else [getattr(torch, dtype)]
    common = dict(micro_batch_size=batch, cache=Split(device=1.0))
    packed = Policy(compress_weights=Q4, **common)
    if resident_share(shape, packed, budget, batch, dtypes, args) < 1.0:
        raise SystemExit(
            f"A budget of {human_bytes(budget)} cannot hold the 4-bit weights at batch {batch}."
        )
    plain = Policy(direct_io=True, **common)
    resident = resident_share(shape, plain, budget, batch, dtypes, args)
    split = Split(device=resident, disk=round(1 - resident, 2))
    return {
        "plain": dict(policy=replace(plain, weights=split), dtype=dtype),
        "4-bit": dict(policy=packed, dtype=dtype),
    }


def resident_runs(dtypes: list[str]) -> dict[str, dict]:
    """Plain and 4-bit in each dtype (``auto``: ours measures), and 4-bit with the kernel off."""
    runs = {f"plain, {d}": dict(policy=Policy(), dtype=d) for d in dtypes}
    for d in dtypes:
        runs[f"4-bit, {d}"] = dict(policy=Policy(compress_weights=Q4), dtype=d)
    off = Policy(compress_weights=Q4, int4_kernel_rows=0)
    runs[f"4-bit, dequantizing, {dtypes[0]}"] = dict(policy=off, dtype=dtypes[0])
    return runs


def measure(path: str, run: dict, batch: int, args: argparse.Namespace) -> dict:
    """One load + generate (in a fresh process)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 50000, (batch, args.prompt_len))
    offload_dir = os.path.join(args.offload_dir, f"run-{os.getpid()}")
    # The workload run, so that ``dtype="auto"`` prices this one (not FlexGen's 512 + 32).
    workload = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=batch)
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path,
        offload_policy=run["policy"],
        offload_dir=offload_dir,
        dtype=run["dtype"],
        workload=workload,
    ) as model:
        report = model.placement_report
        kernel_rows = model.engine.fetcher.kernel_rows
        dtype = str(model.dtype).removeprefix("torch.")
        out = model.generate(ids, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len)
        stats = model.generation_stats
    steps = max(1, args.gen_len - 1)
    result = {
        "tokens_per_s": stats.tokens_per_second,
        "prefill_s": stats.prefill_seconds,
        "decode_ms_per_step": 1000 * stats.decode_seconds / steps,
        "disk_read_per_forward": stats.bytes_moved.get("disk_to_host", 0) / stats.forwards,
        "resident": report.bytes_per_tier["device"],
        "disk": report.bytes_per_tier["disk"],
        "peak_rss": peak_rss(),
        "kernel_rows": kernel_rows,
        "dtype": dtype,
        "first_tokens": out[:, args.prompt_len].tolist(),
    }
    shutil.rmtree(offload_dir, ignore_errors=True)
    return result


def run_all(path: str, shape: OPTShape, args: argparse.Namespace) -> dict:
    results: dict = {"capped": {}, "resident": {}}
    if "capped" in args.scenarios:
        for batch in args.batches:
            runs = capped_runs(shape, args.budget, batch, args.capped_dtype, args)
            for name, run in runs.items():
                job = (measure, path, run, batch, args)
                out, peak = run_in_cgroup("compression", args.budget, *job)
                out["cgroup_peak"] = peak
                results["capped"][f"{name} @ batch {batch}"] = out
                print(
                    f"capped   {name:<8} batch {batch:<3} {out['dtype']:<9} "
                    f"{out['tokens_per_s']:7.2f} tok/s"
                )
    if "resident" in args.scenarios:
        for name, run in resident_runs(args.dtypes).items():
            out = in_fresh_process(measure, path, run, 1, args)
            results["resident"][name] = out
            print(f"resident {name:<28} {out['dtype']:<9} {out['tokens_per_s']:7.2f} tok/s")
    return results


def report(results: dict, setup: dict) -> str:
    embeddings = (
        "embeddings and LM head included"
        if setup.get("embeddings", True)  # runs saved before the default changed quantized them
        else "embeddings and LM head kept in the compute dtype (the default)"
    )
    lines = [
        f"Measured {setup['date']} on {setup['cpu']} ({setup['cores']} cores, "
        f"{setup['capability']}), torch {setup['torch']}; {setup['shape']} shape, random bf16 "
        f"checkpoint; prompt {setup['prompt_len']}, {setup['gen_len']} new tokens; 4-bit "
        f"weights: `{setup['q4']}` (input-feature groups, stored in the CPU int4 kernel's "
        f"layout), {embeddings}. Each run in a fresh process.",
    ]
    if results["capped"]:
        lines += [
            "",
            f"**Capped** (a memory cgroup of {human_bytes(setup['budget'])} above the process's "
            "baseline, page cache counted, after dropping the page cache; plain reads its disk "
            f"share with O_DIRECT; `dtype={setup['dtype']!r}`):",
            "",
            "| weights | batch | compute dtype | resident | disk | read per forward | cgroup peak "
            "| prefill s | decode ms/step | tokens/s | vs plain | kernel rows |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results["capped"].items():
            system, batch = name.split(" @ batch ")
            base = results["capped"][f"plain @ batch {batch}"]["tokens_per_s"]
            lines.append(
                f"| {system} | {batch} | {r['dtype']} | {human_bytes(r['resident'])} | "
                f"{human_bytes(r['disk'])} | "
                f"{human_bytes(r['disk_read_per_forward'])} | {human_bytes(r['cgroup_peak'])} | "
                f"{r['prefill_s']:.1f} | {r['decode_ms_per_step']:.0f} | "
                f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | "
                f"{r['kernel_rows']} |"
            )
    if results["resident"]:
        runs = results["resident"]
        plain = [n for n in runs if n.startswith("plain") and not n.endswith("auto")]
        best = max(plain, key=lambda n: runs[n]["tokens_per_s"])
        lines += [
            "",
            "**Resident, batch 1** (everything in RAM; `vs best plain` is against "
            f"`{best}`, the faster plain dtype here):",
            "",
            "| weights, dtype asked | computed in | resident | peak RSS | prefill s | "
            "decode ms/token | tokens/s | vs best plain | kernel rows | first tokens = plain's |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            same = r["first_tokens"] == runs[best]["first_tokens"]
            ratio = r["tokens_per_s"] / runs[best]["tokens_per_s"]
            lines.append(
                f"| {name} | {r['dtype']} | {human_bytes(r['resident'])} | "
                f"{human_bytes(r['peak_rss'])} | "
                f"{r['prefill_s']:.2f} | {r['decode_ms_per_step']:.0f} | "
                f"{r['tokens_per_s']:.2f} | {ratio:.2f}x | "
                f"{r['kernel_rows']} | {'yes' if same else 'no'} |"
            )
        for kind in ("plain", "4-bit"):  # auto against the faster explicit dtype of its kind
            asked = [n for n in runs if n.startswith(f"{kind}, ") and "dequantizing" not in n]
            fixed = [n for n in asked if not n.endswith("auto")]
            if f"{kind}, auto" not in runs or not fixed:
                continue
            faster = max(fixed, key=lambda n: runs[n]["tokens_per_s"])
            share = runs[f"{kind}, auto"]["tokens_per_s"] / runs[faster]["tokens_per_s"]
            lines += [
                "",
                f'{kind}, `dtype="auto"` computed in {runs[f"{kind}, auto"]["dtype"]}: '
                f"{share:.0%} of the faster {kind} dtype ({faster.removeprefix(f'{kind}, ')}).",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-1.3b")
    parser.add_argument("--scenarios", default="capped,resident")
    parser.add_argument("--budget", default="2GiB", help="the capped scenario's memory cgroup")
    parser.add_argument("--batches", default="4,32", help="the capped scenario's batch sizes")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16,auto",
        help="the resident scenario's compute dtypes (auto: ours measures which is faster)",
    )
    parser.add_argument("--capped-dtype", default="auto", help="the capped scenario's")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--offload-dir", default=os.path.join(default_cache_dir(), "bench-offload"))
    parser.add_argument("--from-json", default=None, help="report a saved run again")
    parser.add_argument("--docs", default=",".join(DOCS), help="files to write the results in")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.budget = parse_size(args.budget)
    model_dir = args.model_dir or os.path.join(default_cache_dir(), f"{args.shape}-bfloat16")
    saved = os.path.join(args.offload_dir, "compression.json")

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        config = opt_config(args.shape)
        print(f"checkpoint: {model_dir} (built once)", flush=True)
        write_random_checkpoint(model_dir, config, torch.bfloat16)
        shape = OPTShape.from_config(config)
        if "auto" in (args.capped_dtype, *args.dtypes):  # measured once here, not in the runs
            os.makedirs(args.offload_dir, exist_ok=True)
            dtype_profiles("auto", CPU, args.offload_dir, (shape.hidden, shape.ffn))
        results = run_all(model_dir, shape, args)
        setup = {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "shape": args.shape.upper(),
            "prompt_len": args.prompt_len,
            "gen_len": args.gen_len,
            "q4": repr(Q4),
            "embeddings": Policy().compress_embeddings,
            "budget": args.budget,
            "dtype": args.capped_dtype,
        }
        data = {"setup": setup, "results": results}
        os.makedirs(args.offload_dir, exist_ok=True)
        with open(saved, "w") as f:
            json.dump(data, f, indent=2)
    text = report(data["results"], data["setup"])
    print(text)
    if not args.no_write:
        for doc in args.docs.split(","):
            write_between_markers(doc, START, END, text)
            print(f"wrote {os.path.normpath(doc)}")
    return data


if __name__ == "__main__":
    main()
