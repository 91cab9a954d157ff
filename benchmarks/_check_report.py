"""The GPU check's summary: one line per phase and the side-by-side throughput table, in
markdown (printed, written to ``<out>/summary.md``, pasted into docs/benchmarks.md).

Reads only the phases' JSON files, so a summary can be remade from a results folder copied
back from the GPU machine, and written between the markers of docs/benchmarks.md::

    python benchmarks/_check_report.py DIR [--doc docs/benchmarks.md]

No torch import: the parent process of the check stays light.
"""

from __future__ import annotations

import argparse
import json
import os

NA = "n/a"


def load(out: str, phases: tuple[str, ...]) -> dict[str, dict]:
    """Each phase's record in ``out`` (those that have one)."""
    records = {}
    for phase in phases:
        try:
            with open(os.path.join(out, f"{phase}.json")) as f:
                records[phase] = json.load(f)
        except (OSError, ValueError):
            continue
    return records


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return NA
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes:.0f}B"


def last_line(text: str | None) -> str:
    """The last non-blank line of ``text`` ("" for none: an empty error must not lose the
    summary)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def phase_note(phase: str, r: dict) -> str:
    """What one phase found, in a table cell."""
    if r["status"] != "ok":
        return (
            last_line(r.get("reason") or r.get("error"))[:200] or f"{r['status']}, no reason given"
        )
    if phase == "env":
        gpu = f", {r['gpu']} ({size(r['gpu_memory'])})" if r.get("gpu") else ""
        return f"torch {r['torch']} (CUDA {r['torch_cuda']}){gpu}, Python {r['python']}"
    if phase == "probe":
        p = r["profile"]
        top = max(p["matmul_flops"].values())
        return (
            f"matmul up to {top / 1e12:.3g} TFLOP/s, host->device "
            f"{p['host_to_device'] / 1e9:.1f} GB/s, disk {p['disk_read'] / 1e9:.2f} GB/s, "
            f"overlap penalty {p['overlap_penalty']:.2f}"
        )
    if phase == "golden":
        same = sum(c["tokens_equal"] for c in r["cases"])
        worst = max(c["max_logit_diff"] for c in r["cases"])
        return (
            f"tokens equal to stock in {same}/{len(r['cases'])} cases; max logit diff "
            f"{worst:.1e} (fp32 tolerance atol 1e-3, rtol 1e-4; fp16 atol 2e-2)"
        )
    if phase == "overlap":
        share = r["overlapped_fraction"]
        return (
            f"{NA if share is None else f'{share:.0%}'} of {r['copy_us'] / 1e3:.1f} ms of "
            f"side-stream copies overlapped compute; generate {r['speedup']:.2f}x as fast "
            "with overlap as without"
        )
    if phase == "checkpoint":
        return f"{size(r['bytes'])}, {'reused' if r['reused'] else 'built'}"
    if phase == "cuda-tests":
        return r["summary"]
    return f"{r['tokens_per_s']:.2f} tokens/s at batch {r['batch']}"


def phase_table(records: dict[str, dict]) -> list[str]:
    lines = ["| phase | status | seconds | result |", "|---|---|---:|---|"]
    for phase, r in records.items():
        wall = r.get("wall_s")
        lines.append(
            f"| {phase} | {r['status']} | {'' if wall is None else f'{wall:.0f}'} "
            f"| {phase_note(phase, r)} |"
        )
    return lines


# Where two systems' greedy tokens part, the sum of their top-1/top-2 logit margins at that
# step below this is a near-tie: kernel differences (GEMM shapes, fp16 accumulation over
# thousands of terms) move logits by about this much, so either token is right.
NEAR_TIE = {"float16": 5e-2, "bfloat16": 2e-1, "float32": 1e-3}


def same_tokens(r: dict, stock: dict | None, near_tie: float = NEAR_TIE["float16"]) -> str:
    """Whether a system's greedy tokens are stock's, on the rows both generated; rows that
    part at a near-tie (both margins recorded, summing under ``near_tie``) are told apart."""
    if r["system"] == "stock":
        return ""
    if r["system"] == "flexgen":
        return "n/a (ones as weights)"
    if not stock or stock.get("status") != "ok":
        return NA
    rows = min(len(r["tokens"]), len(stock["tokens"]))
    differ = [i for i in range(rows) if r["tokens"][i] != stock["tokens"][i]]
    if not differ:
        return "yes"
    ties = [i for i in differ if _parts_at_near_tie(i, r, stock, near_tie)]
    if len(ties) == len(differ):
        return f"yes, but {len(ties)}/{rows} rows part at a near-tie (margins < {near_tie:g})"
    tied = f", {len(ties)} more part at a near-tie" if ties else ""
    return f"{rows - len(differ)}/{rows} rows{tied}"


def _parts_at_near_tie(row: int, r: dict, stock: dict, near_tie: float) -> bool:
    ours, theirs = r["tokens"][row], stock["tokens"][row]
    step = next(t for t, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    try:
        margin = r["margins"][row][step] + stock["margins"][row][step]
    except (KeyError, IndexError):  # results from before margins were recorded
        return False
    return margin < near_tie


def throughput_table(records: dict[str, dict]) -> list[str]:
    runs = {
        p.removeprefix("throughput-"): r
        for p, r in records.items()
        if p.startswith("throughput-") and r["status"] == "ok"
    }
    if not runs:
        return []
    stock, accelerate = runs.get("stock"), runs.get("accelerate")
    lines = [
        "| system | batch | policy | tokens/s | prefill s | decode s | load s | GPU peak "
        "allocated | GPU peak reserved | pinned host peak (torch) | pinned host (ours, "
        "registered) | vs FlexGen | vs accelerate | tokens = stock's |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for system, r in runs.items():
        peaks = r.get("peaks", {})
        # An -offload row (FlexGen's policy for a model that does not fit) is compared with
        # FlexGen under the same policy and cap.
        flexgen = runs.get("flexgen-offload" if system.endswith("-offload") else "flexgen")

        def ratio(base: dict | None, r: dict = r, system: str = system) -> str:
            return (
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base is not r else ""
            )

        cells = [
            system,
            str(r["batch"]),
            r.get("policy_text", ""),
            f"{r['tokens_per_s']:.2f}",
            _seconds(r.get("prefill_s")),
            _seconds(r.get("decode_s")),
            _seconds(r.get("load_s")),
            size(peaks.get("device_allocated_peak")),
            size(peaks.get("device_reserved_peak")),
            size(peaks.get("pinned_host_peak")),
            size(r.get("registered_host_bytes")),
            ratio(flexgen),
            ratio(accelerate),
            same_tokens(r, stock, NEAR_TIE.get(r.get("dtype"), NEAR_TIE["float16"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seconds(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}"


def header(spec: dict, records: dict[str, dict]) -> str:
    env = records.get("env", {})
    versions = env.get("versions", {})
    packages = ", ".join(
        f"{k} {versions[k]}" for k in ("transformers", "accelerate", "flexgen") if versions.get(k)
    )
    cap = f"a {spec['cap']} cap per system" if spec.get("cap") else "no device cap (CPU)"
    off = spec.get("offload")
    offload = (
        f"The -offload rows: FlexGen's policy for OPT-30B on a 16 GB GPU, --percent "
        f"{' '.join(map(str, off['percent']))}, gpu batch {off['gpu_batch_size']} x "
        f"{off['num_gpu_batches']}, cpu cache compute {off['cpu_cache_compute']}, "
        f"{'a ' + off['cap'] + ' cap' if off.get('cap') else 'no device cap'}. "
        if off
        else ""
    )
    scale = spec.get("weight_scale", 1.0)
    cap += f"; random weights with std 0.02 x {scale:g}" if scale != 1.0 else ""
    return (
        f"`benchmarks/gpu_check.py --device {spec['device']} --shape {spec['shape']}`: "
        f"{spec['model']} shape, random {spec['checkpoint_dtype']} checkpoint computed in "
        f"{spec['dtype']}, prompt {spec['prompt_len']}, {spec['gen_len']} new tokens, {cap}; "
        f"FlexGen's policy (also ours-fixed): --percent {' '.join(map(str, spec['percent']))}, "
        f"gpu batch {spec['gpu_batch_size']} x {spec['num_gpu_batches']}, overlap "
        f"{spec['overlap']}. {offload}{packages}."
    )


def summary(out: str, phases: tuple[str, ...]) -> str:
    records = load(out, phases)
    with open(os.path.join(out, "spec.json")) as f:
        spec = json.load(f)
    table = throughput_table(records)
    return "\n".join(
        [header(spec, records), "", *phase_table(records), *(["", *table] if table else [])]
    )


START, END = "<!-- benchmark:gpu-check:start -->", "<!-- benchmark:gpu-check:end -->"


def main(argv: list[str] | None = None) -> None:
    from gpu_check import PHASES

    parser = argparse.ArgumentParser(description="The GPU check's summary, from its results.")
    parser.add_argument("out", help="the check's --out folder")
    parser.add_argument("--doc", help="also write it between the gpu-check markers of this file")
    args = parser.parse_args(argv)
    text = summary(args.out, PHASES)
    print(text)
    if args.doc:
        from _common import write_between_markers  # imports hf_flexoffload: only here

        write_between_markers(args.doc, START, END, text)


if __name__ == "__main__":
    main()
