"""One system, one run: stock transformers, accelerate, FlexGen 0.1.8 or ours on one device
under one GPU-memory cap, timed as FlexGen times itself.

Run it once per system, each in a fresh process (``gpu_check.py``'s throughput phases do), so
the cap (``torch.cuda.set_per_process_memory_fraction``) and the peaks are that system's alone:

* ``stock``: ``OPTForCausalLM`` wholly on the device (skipped when its weights exceed the cap);
* ``accelerate``: ``device_map="auto"`` with ``max_memory={gpu: cap - working memory, "cpu":
  host}`` (on the CPU: ``{"cpu": host}``), the rest offloaded by accelerate;
* ``flexgen``: FlexGen's ``OptLM`` under FlexGen's ``--percent`` / batch policy (``_flexgen.py``);
* ``ours-fixed``: ours under the same policy (``Policy.from_flexgen``);
* ``ours-auto``: ours with ``offload_policy="auto"``, ``max_memory={"device": cap}``: it picks
  its own block.

Every system gets the same synthetic prompts (row i is the same whatever the batch), warms up
with a 2-token ``generate``, then one ``generate`` of ``--gen-len`` tokens is timed, wall clock
synchronized: throughput = generated tokens / that time (FlexGen's metric). Prints (and with
``--out`` writes) one JSON object: times, GPU peaks at load and generate, pinned host bytes,
the generated token ids.

Usage::

    python benchmarks/side_by_side.py --system ours-auto --model opt-6.7b --device cuda \\
        --device-cap 16GiB --prompt-len 512 --gen-len 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import _device
import _flexgen
import torch
from _common import describe_policy, peak_rss, reset_peak_rss
from checkpoints import checkpoint_name, opt_config, write_random_checkpoint
from transformers import LogitsProcessorList, OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Workload
from hf_flexoffload.planning.budget import parse_size
from hf_flexoffload.planning.hardware import default_cache_dir

SYSTEMS = ("stock", "accelerate", "flexgen", "ours-fixed", "ours-auto")


class Skip(Exception):
    """This system cannot run here; the message says why (recorded, not a failure)."""


def synthetic_ids(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``batch`` random prompts; row i is the same for every ``batch`` (rows drawn in turn), so
    runs with different blocks can be compared row by row."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (prompt_len,), generator=g) for _ in range(batch)]
    return torch.stack(rows)


def _weight_bytes(config, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in OPTForCausalLM(config).parameters()) * dtype.itemsize


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, path: str):
    """The system's model on ``device`` (flexgen is built in ``run_flexgen``)."""
    config = opt_config(args.model)
    cap = args.device_cap
    if args.system == "stock":
        weights = _weight_bytes(config, dtype)
        if cap is not None and weights > cap:
            raise Skip(f"its {_device.fmt(weights)} of weights exceed the {_device.fmt(cap)} cap")
        return OPTForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if args.system == "accelerate":
        room = None if cap is None else cap - args.working_memory
        host = args.host_cap or parse_size("1TiB")
        return OPTForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map="auto",
            max_memory=_device.accelerate_max_memory(device, room, host),
            offload_folder=os.path.join(args.work_dir, f"accelerate-{os.getpid()}"),
        ).eval()
    max_memory = {k: v for k, v in (("device", cap), ("host", args.host_cap)) if v is not None}
    if args.system == "ours-auto":
        policy = "auto"
        workload = Workload(
            prompt_len=args.prompt_len, gen_len=args.gen_len, max_batch_size=args.auto_max_batch
        )
    else:
        policy = _flexgen.ours_policy(
            args.percent,
            args.gpu_batch_size,
            args.num_gpu_batches,
            overlap=args.overlap,
            cpu_cache_compute=args.cpu_cache_compute,
        )
        workload = None
    return FlexOffloadOPTForCausalLM.from_pretrained(
        path,
        offload_policy=policy,
        device=device,
        dtype=dtype,
        max_memory=max_memory or None,
        offload_dir=os.path.join(args.work_dir, f"offload-{os.getpid()}"),
        workload=workload,
    )


def run_hf(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """stock, accelerate or ours: load, warm up, time one ``generate``."""
    path = checkpoint(args)
    _device.reset_peaks(device)
    start = time.perf_counter()
    model = load(args, device, dtype, path)
    _device.synchronize(device)
    out: dict = {"load_s": time.perf_counter() - start, "load_peaks": _device.peaks(device)}
    try:
        batch = model.offload_policy.block_size if args.system == "ours-auto" else args.batch
        ids = synthetic_ids(batch, args.prompt_len, opt_config(args.model).vocab_size).to(device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            _device.synchronize(device)
            _device.reset_peaks(device)
            first, margins = _device.FirstToken(device), _device.Margins()
            start = time.perf_counter()
            seqs = model.generate(
                ids,
                max_new_tokens=args.gen_len,
                min_new_tokens=args.gen_len,
                logits_processor=LogitsProcessorList([first, margins]),
                **kw,
            )
            _device.synchronize(device)
        seconds = time.perf_counter() - start
        out.update(
            seconds=seconds,
            prefill_s=first.at - start,
            decode_s=seconds - (first.at - start),
            batch=batch,
            tokens=seqs[:, args.prompt_len :].tolist(),
            margins=margins.rows(),
            peaks=_device.peaks(device),
            registered_host_bytes=_device.registered_host_bytes(model),
        )
        if args.system.startswith("ours"):
            out["policy"] = model.generation_stats.policy.to_dict()
            out["policy_text"] = describe_policy(out["policy"])
    finally:
        if hasattr(model, "close"):
            model.close()
    return out


def run_flexgen(args: argparse.Namespace, device: torch.device) -> dict:
    reason = _flexgen.unavailable(device)
    if reason:
        raise Skip(reason)
    policy = _flexgen.policy_kwargs(
        args.percent,
        args.gpu_batch_size,
        args.num_gpu_batches,
        overlap=args.overlap,
        cpu_cache_compute=args.cpu_cache_compute,
    )
    config = opt_config(args.model)
    ids = synthetic_ids(args.batch, args.prompt_len, config.vocab_size)
    _device.reset_peaks(device)
    out = _flexgen.run(config, args.model, policy, ids, args.gen_len, args.work_dir, device)
    return {**out, "batch": args.batch, "peaks": _device.peaks(device)}


def checkpoint(args: argparse.Namespace) -> str:
    """The random checkpoint of ``--model`` in ``--checkpoint-dtype`` (built once)."""
    name = checkpoint_name(args.model, args.checkpoint_dtype, args.weight_scale)
    path = os.path.join(args.checkpoint_dir, name)
    dtype = getattr(torch, args.checkpoint_dtype)
    draw = "cuda" if torch.cuda.is_available() else "cpu"  # fast; the file is what matters
    config = opt_config(args.model)
    return write_random_checkpoint(path, config, dtype, device=draw, scale=args.weight_scale)


def measure(args: argparse.Namespace) -> dict:
    """The run, as a result dict with ``status`` ok / skipped (``reason``)."""
    device = _device.resolve(args.device)
    dtype = getattr(torch, args.dtype)
    fraction = _device.cap_memory(device, args.device_cap)
    os.makedirs(args.work_dir, exist_ok=True)
    head = {
        "system": args.system,
        "device": _device.describe(device),
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "cap": args.device_cap,
        "cap_fraction": fraction,
    }
    reset_peak_rss()
    try:
        out = run_flexgen(args, device) if args.system == "flexgen" else run_hf(args, device, dtype)
    except Skip as why:
        return {**head, "status": "skipped", "reason": str(why)}
    finally:
        shutil.rmtree(os.path.join(args.work_dir, f"offload-{os.getpid()}"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.work_dir, f"accelerate-{os.getpid()}"), ignore_errors=True)
    tokens = out["batch"] * args.gen_len
    return {
        **head,
        "status": "ok",
        **out,
        "tokens_per_s": tokens / out["seconds"],
        "host_peak_rss": peak_rss(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, choices=SYSTEMS)
    parser.add_argument("--model", default="opt-6.7b", help="an OPT shape (checkpoints.py)")
    parser.add_argument("--dtype", default="float16", help="compute dtype")
    parser.add_argument("--checkpoint-dtype", default="float16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument(
        "--percent",
        type=float,
        nargs=6,
        default=[100, 0, 100, 0, 100, 0],
        help="FlexGen's --percent: weights, cache, activations on GPU and CPU",
    )
    parser.add_argument("--gpu-batch-size", type=int, default=2)
    parser.add_argument("--num-gpu-batches", type=int, default=1)
    parser.add_argument("--no-overlap", dest="overlap", action="store_false")
    parser.add_argument(
        "--cpu-cache-compute",
        action="store_true",
        help="FlexGen's --cpu-cache-compute: attention over the host-tier cache on the CPU",
    )
    parser.add_argument(
        "--weight-scale",
        type=float,
        default=1.0,
        help="x the random checkpoint's weights (std 0.02 x this; checkpoints.py)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="prompts (default: the policy's block, gpu batch x batches)",
    )
    parser.add_argument(
        "--auto-max-batch", type=int, default=256, help="ours-auto: the largest block it may choose"
    )
    parser.add_argument("--host-cap", type=parse_size, default=None, help="RAM for ours/accelerate")
    parser.add_argument(
        "--working-memory",
        type=parse_size,
        default=parse_size("2GiB"),
        help="of the cap, what accelerate keeps free for KV cache and activations",
    )
    parser.add_argument("--checkpoint-dir", default=default_cache_dir())
    parser.add_argument("--work-dir", default=os.path.join(default_cache_dir(), "side-by-side"))
    parser.add_argument("--out", help="also write the JSON here")
    _device.add_device_arguments(parser, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.batch = args.batch or args.gpu_batch_size * args.num_gpu_batches
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(
        text if len(text) < 4000 else json.dumps({k: v for k, v in result.items() if k != "tokens"})
    )
    return result


if __name__ == "__main__":
    main()
