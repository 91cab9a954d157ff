"""FlexGen 0.1.8 side by side: its ``OptLM`` driven directly, on synthetic token ids.

FlexGen's own runner (``python -m flexgen.flex_opt``) downloads a tokenizer and fails offline,
so this builds what the runner builds (``ExecutionEnv``, ``Policy``, ``OptConfig``) and times
``OptLM.generate`` itself. Weights are FlexGen's benchmark weights: a path containing
``_DUMMY_`` makes it fill every tensor with ones instead of reading files, as its benchmark
suite does; the values do not change the time of the kernels.

flexgen is imported lazily (it is not a dependency of this project: ``make gpu-wheels`` puts
its wheel beside the GPU check). Importing ``flexgen.flex_opt`` needs torch, numpy, tqdm,
transformers (``AutoTokenizer``, unused here) and attrs; pulp only its separate cost model.
``OptLM`` makes CUDA streams when built: it needs a CUDA device.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch
from transformers import OPTConfig

from hf_flexoffload import Policy

FLEXGEN_VERSION = "0.1.8"
DUMMY = "_DUMMY_"  # flex_opt.DUMMY_WEIGHT: in a weight path, ones instead of files


def unavailable(device: torch.device) -> str | None:
    """Why FlexGen cannot run here, or None."""
    if importlib.util.find_spec("flexgen") is None:
        return f"flexgen is not installed (pip install flexgen=={FLEXGEN_VERSION}; docs/gpu.md)"
    if torch.device(device).type != "cuda":
        return "FlexGen needs CUDA (OptLM creates CUDA streams)"
    return None


def opt_config_kwargs(config: OPTConfig, name: str) -> dict:
    """FlexGen's ``OptConfig`` fields for a transformers OPT config (fp16, FlexGen's dtype)."""
    import numpy as np

    if config.word_embed_proj_dim != config.hidden_size or not config.do_layer_norm_before:
        raise ValueError("FlexGen runs pre-LN OPT without embedding projections (not opt-350m).")
    return dict(
        name=name,
        num_hidden_layers=config.num_hidden_layers,
        max_seq_len=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        n_head=config.num_attention_heads,
        input_dim=config.hidden_size,
        ffn_embed_dim=config.ffn_dim,
        vocab_size=config.vocab_size,
        pad_token_id=config.pad_token_id,
        dtype=np.float16,
    )


def policy_kwargs(
    percent: list[float],
    gpu_batch_size: int,
    num_gpu_batches: int,
    *,
    overlap: bool,
    cpu_cache_compute: bool = False,
    pin_weight: bool = True,
) -> dict:
    """FlexGen's ``Policy`` fields, as its command line sets them (``sep_layer`` and no
    compression are its defaults; compression configs are the runner's, unused when off)."""
    wg, wc, cg, cc, hg, hc = percent
    return dict(
        gpu_batch_size=gpu_batch_size,
        num_gpu_batches=num_gpu_batches,
        w_gpu_percent=wg,
        w_cpu_percent=wc,
        cache_gpu_percent=cg,
        cache_cpu_percent=cc,
        act_gpu_percent=hg,
        act_cpu_percent=hc,
        overlap=overlap,
        sep_layer=True,
        pin_weight=pin_weight,
        cpu_cache_compute=cpu_cache_compute,
        attn_sparsity=1.0,
        compress_weight=False,
        compress_cache=False,
    )


def ours_policy(
    percent: list[float],
    gpu_batch_size: int,
    num_gpu_batches: int,
    *,
    overlap: bool,
    cpu_cache_compute: bool = False,
) -> Policy:
    """The same policy for ours: FlexGen's percentages, block shape and options
    (``cpu_cache_compute``: attention over the host-tier cache on the CPU, ours'
    ``host_attention``)."""
    return Policy.from_flexgen(
        percent,
        gpu_batch_size=gpu_batch_size,
        num_gpu_batches=num_gpu_batches,
        overlap=overlap,
        cpu_cache_compute=cpu_cache_compute,
        pin_weight=True,
    )


def run(
    config: OPTConfig,
    name: str,
    policy: dict,
    ids: torch.Tensor,
    gen_len: int,
    work_dir: str,
    device: torch.device,
) -> dict:
    """Build FlexGen's model under ``policy`` (``policy_kwargs``), warm up, then time one
    ``generate`` of ``ids`` (a block of ``gpu_batch_size * num_gpu_batches`` prompts).

    Returns:
        ``seconds`` (wall, synchronized), ``prefill_s``/``decode_s`` (FlexGen's own timer),
        ``load_s``, ``tokens`` (the generated ids, as lists).
    """
    from flexgen.compression import CompressionConfig
    from flexgen.flex_opt import OptLM
    from flexgen.flex_opt import Policy as FlexPolicy
    from flexgen.opt_config import OptConfig
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchMixedDevice
    from flexgen.timer import timers
    from flexgen.utils import ExecutionEnv

    gpu, cpu = TorchDevice(str(device)), TorchDevice("cpu")
    disk = TorchDisk(os.path.join(work_dir, "flexgen-offload"))
    env = ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=TorchMixedDevice([gpu, cpu, disk]))
    flex_policy = FlexPolicy(
        **policy,
        comp_weight_config=CompressionConfig(
            num_bits=4, group_size=64, group_dim=0, symmetric=False
        ),
        comp_cache_config=CompressionConfig(
            num_bits=4, group_size=64, group_dim=2, symmetric=False
        ),
    )
    try:
        start = time.perf_counter()
        model = OptLM(OptConfig(**opt_config_kwargs(config, name)), env, DUMMY, flex_policy)
        torch.cuda.synchronize(device)
        load_s = time.perf_counter() - start
        prompts = ids.tolist()
        model.generate(prompts, max_new_tokens=1)  # warm-up, as FlexGen's runner does
        timers("generate").reset()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=gen_len)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        costs = timers("generate").costs
    finally:
        env.close_copy_threads()
    return {
        "seconds": seconds,
        "load_s": load_s,
        "prefill_s": costs[0] if costs else None,
        "decode_s": sum(costs[1:]) if costs else None,
        "tokens": out[:, ids.shape[1] :].tolist(),
    }
