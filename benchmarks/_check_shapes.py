"""The shapes ``gpu_check.py`` compares: the model, the prompt, FlexGen's policy for it, and
FlexGen's policy for a model that does not fit (the ``-offload`` throughput rows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Offload:
    """FlexGen's policy for a model that does not fit its GPU: its paper's OPT-30B setting on a
    16 GB T4 (benchmark/flexgen/bench_suite.py, suite_30b_1x1 at prompt 512: ``--percent 20 80
    0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu``), applied to the shape under a
    cap scaled as the weights are (30B's 60 GB on 16 GB: 20% of the weights on the GPU)."""

    percent: tuple[int, ...]
    gpu_batch_size: int
    num_gpu_batches: int
    cpu_cache_compute: bool
    cap: str  # the device cap of these rows (CUDA)


@dataclass(frozen=True)
class Shape:
    """What the throughput phases compare. FlexGen's policy (``percent``: weights, KV cache and
    activations on GPU and CPU, in %; gpu batch size x batches) is its own benchmark's for
    OPT-6.7B at prompt 512 (benchmark/flexgen/bench_suite.py, suite_6b7_1x1, a 16 GB T4). Its
    suite has no OPT-13B case; ours for it: 40% of the weights on the GPU, 60% pinned on the
    host, batch 8 (about 10 GiB of weights and 3.5 GiB of KV cache under the 16 GiB cap).
    ``weight_scale``: the random weights' std is 0.02 x this, so greedy tokens have no
    near-ties for kernel differences to flip (checkpoints.py)."""

    model: str  # an OPT shape of checkpoints.py
    dtype: str  # compute dtype, and the random checkpoint's
    prompt_len: int
    gen_len: int
    percent: tuple[int, ...]  # FlexGen's --percent
    gpu_batch_size: int
    num_gpu_batches: int
    overlap: bool
    auto_max_batch: int  # the largest block ours-auto may choose (bounds the phase's time)
    offload: Offload
    weight_scale: float = 1.0


# 20% of the weights on the GPU, the KV cache and activations on the host, attention there.
FLEXGEN_30B = dict(percent=(20, 80, 0, 100, 0, 100), cpu_cache_compute=True)
SHAPES = {
    "opt-6.7b": Shape(
        "opt-6.7b", "float16", 512, 32, (100, 0, 100, 0, 100, 0), 2, 1, False, 64,
        Offload(**FLEXGEN_30B, gpu_batch_size=48, num_gpu_batches=3, cap="6GiB"), 4.0,
    ),
    "opt-13b": Shape(
        "opt-13b", "float16", 512, 32, (40, 60, 100, 0, 100, 0), 8, 1, True, 64,
        Offload(**FLEXGEN_30B, gpu_batch_size=48, num_gpu_batches=3, cap="10GiB"), 4.0,
    ),
    # Seconds on a CPU: every phase runs end to end, the numbers mean nothing.
    "tiny": Shape(
        "opt-tiny", "float32", 8, 4, (50, 50, 100, 0, 100, 0), 2, 2, True, 8,
        Offload(**FLEXGEN_30B, gpu_batch_size=2, num_gpu_batches=2, cap="1GiB"), 4.0,
    ),
}  # fmt: skip
