"""Where the memory goes: measured private memory against the memory model, per policy.

Builds bf16 OPT checkpoints (the issue's 483 MiB shape: vocab 50272, hidden 1024, 16 layers,
tied; and a 97 MiB one: hidden 512, 8 layers), then runs each case in a fresh process with
``tests/memory_probe.py`` (RssAnon sampled every 2 ms from before ``from_pretrained``, the
interpreter and torch subtracted) and writes the table to docs/benchmarks.md.

Usage: ``python benchmarks/memory.py`` (about 2 minutes on 2 cores); ``--device cuda`` runs
the model on the GPU (the probe's default device there) and adds the GPU's allocated and
reserved peaks over load and generate, compared with the memory model's device bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile

import _device
import torch
from _common import write_between_markers
from transformers import OPTConfig, OPTForCausalLM

from hf_flexoffload.planning.probes import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "..", "tests", "memory_probe.py")
DOC = os.path.join(HERE, "..", "docs", "benchmarks.md")
START, END = "<!-- benchmark:memory:start -->", "<!-- benchmark:memory:end -->"
MiB = 2**20

SHAPES = {"opt-483m": (1024, 16, 16, 4096), "opt-97m": (512, 8, 8, 2048)}


def _probe_module():
    """tests/memory_probe.py (not a package): the placements the memory tests measure, and the
    measurement."""
    spec = importlib.util.spec_from_file_location("memory_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MEMORY_PROBE = _probe_module()
PLACEMENTS = MEMORY_PROBE.PLACEMENTS
TEN, ON_DISK, FOUR_BIT = (PLACEMENTS[k] for k in ("ten_percent", "on_disk", "four_bit"))
CASES = [
    ("opt-483m", "10% resident, 90% disk", TEN),
    ("opt-97m", "10% resident, 90% disk", TEN),
    ("opt-97m", "weights + half the cache + hidden states on disk", ON_DISK),
    ("opt-97m", "4-bit weights, 50% resident", FOUR_BIT),
]


def checkpoint(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        hidden, layers, heads, ffn = SHAPES[name]
        config = OPTConfig(
            vocab_size=50272,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=ffn,
            max_position_embeddings=256,
        )
        torch.manual_seed(0)
        OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def probe(args: dict, device: str) -> dict:
    """tests/memory_probe.py's measurement in a fresh process (``child``), on ``device``."""
    # The probe loads on its default device, cuda:0 when there is one: hide the GPU for CPU runs.
    env = dict(os.environ, **({} if device.startswith("cuda") else {"CUDA_VISIBLE_DEVICES": ""}))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args: dict) -> dict:
    """The probe in this process, and the GPU's peaks over it (None on the CPU)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    _device.cap_memory(device, args.pop("device_cap", None))
    _device.reset_peaks(device)
    return {**MEMORY_PROBE.main(args), **_device.peaks(device)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mem-bench"))
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    _device.add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cuda = _device.is_cuda(_device.resolve(args.device))
    rows = [
        "| model | policy | compute | load peak | load term | generate peak | predicted "
        f"| peak / predicted | peak / checkpoint bytes | {_device.PEAK_HEADER} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, label, placement in CASES:
        path = checkpoint(args.work_dir, model)
        for dtype in ("bfloat16", "float32"):
            policy = {"micro_batch_size": 4, "num_micro_batches": 2, **placement}
            r = probe(
                {
                    "checkpoint": path,
                    "policy": policy,
                    "dtype": dtype,
                    "batch": 8,
                    "prompt": 16,
                    "new_tokens": 4,
                    "device_cap": args.device_cap,
                },
                args.device,
            )
            # On CUDA the memory model's footprint is device memory: compare the GPU's peak.
            peak = r["device_allocated_peak"] if cuda else r["peak"]
            rows.append(
                f"| {model} | {label} | {dtype} | {r['load_peak'] / MiB:.1f}MiB "
                f"| {r['load_term'] / MiB:.1f}MiB | {r['peak'] / MiB:.1f}MiB "
                f"| {r['footprint'] / MiB:.1f}MiB | {peak / r['footprint']:.2f} "
                f"| {peak / os.path.getsize(os.path.join(path, 'model.safetensors')):.3f} "
                f"| {' | '.join(_device.peak_cells(r))} |"
            )
            print(rows[-1], flush=True)
    head = (
        f"Measured on {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, the model on {args.device}"
        + (
            " (peak / predicted: the GPU's allocated peak against the model's device bytes)"
            if cuda
            else ""
        )
        + "; bf16 checkpoints (vocab 50272, tied head); micro-batches 4 x 2, "
        "prompt 16, 4 new tokens; each case in a fresh process, RssAnon above the baseline "
        "(interpreter, torch, transformers loaded), sampled every 2 ms. *Predicted* is the "
        "memory model's footprint (`generation_stats.memory`); the tests allow "
        "`RUNTIME_SLACK` = 24 MiB above it and require at least 0.7 of it."
    )
    write_between_markers(args.doc, START, END, head + "\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
