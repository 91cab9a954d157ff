"""Measure a model's private memory (RssAnon) while loading and generating, in this process.

Run as a script in a fresh process (``python tests/memory_probe.py '<json>'``) so the peaks
belong to this model alone. A thread samples ``RssAnon`` every 2 ms from before
``from_pretrained``; the interpreter, torch and transformers are loaded and warmed up first and
subtracted (the baseline). Prints one JSON line: the load and generate peaks over the baseline,
and what the memory model predicted for both.

Arguments (one JSON object): ``checkpoint``, ``policy`` (a Policy dict, or "auto"), ``dtype``,
``offload_dir`` (optional), ``max_memory`` (optional), ``batch``, ``prompt``, ``new_tokens``,
``workload`` (optional Workload dict for "auto").
"""

from __future__ import annotations

import json
import sys
import threading
import time

# Placements the memory tests and benchmarks/memory.py measure (Policy dict fields).
PLACEMENTS = {
    "ten_percent": {"weights": {"device": 0.1, "host": 0.0, "disk": 0.9}},
    "on_disk": {
        "weights": {"device": 0.0, "host": 0.0, "disk": 1.0},
        "cache": {"device": 0.5, "host": 0.0, "disk": 0.5},
        "activations": {"device": 0.0, "host": 0.0, "disk": 1.0},
    },
    "four_bit": {
        "weights": {"device": 0.5, "host": 0.0, "disk": 0.5},
        "compress_weights": {"bits": 4, "group_size": 64},
        # The memory model counts the dequantized layer buffers, which steps the int4 kernel
        # runs never allocate: pinned off, so the footprint's lower bound is tested too.
        "int4_kernel_rows": 0,
    },
}


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class Sampler:
    """The highest RssAnon seen since the last ``reset``, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_anon())

    def reset(self) -> None:
        self.peak = rss_anon()

    def read(self) -> int:
        time.sleep(0.01)  # at least one more sample
        return max(self.peak, rss_anon())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(args: dict) -> dict:
    import torch

    from hf_flexoffload import AutoFlexOffloadModelForCausalLM, Policy, Workload
    from hf_flexoffload.planning.memory_model import footprint

    # Warm up the kernels and allocator paths the run will use, so they count as baseline.
    dtype = getattr(torch, args["dtype"])
    a = torch.randn(64, 64).to(dtype)
    (a @ a).sum().item()
    torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
    policy = args["policy"] if args["policy"] == "auto" else Policy.from_dict(args["policy"])
    workload = Workload(**args["workload"]) if args.get("workload") else None
    sampler = Sampler()
    base = rss_anon()
    model = AutoFlexOffloadModelForCausalLM.from_pretrained(
        args["checkpoint"],
        offload_policy=policy,
        dtype=dtype,
        offload_dir=args.get("offload_dir"),
        max_memory=args.get("max_memory"),
        workload=workload,
    )
    load_peak = sampler.read() - base
    engine = model.engine
    _, load_term = footprint(
        engine.arch,
        engine.dtype,
        engine.policy,
        engine.workload,
        shared=True,
        storage=engine.storage,
        quantizing=engine.policy.compress_weights is not None,
    )
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (args["batch"], args["prompt"]))
    sampler.reset()
    model.generate(ids, max_new_tokens=args["new_tokens"], do_sample=False)
    peak = sampler.read() - base
    sampler.stop()
    stats = model.generation_stats
    return {
        "load_peak": load_peak,
        "load_term": load_term,
        "peak": peak,
        "footprint": stats.memory.memory,
        "items": stats.memory.items,
        "policy": stats.policy.to_dict(),
        "weights_bytes": model.placement_report.total_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
