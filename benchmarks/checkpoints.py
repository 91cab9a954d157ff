"""Random-weight checkpoints of the public OPT shapes (opt-125m ... opt-30b), with no hub access.

The tensors are generated and written one at a time into safetensors shards, so building
opt-13b (26 GB in bf16) needs about one shard of RAM, not the model's size. Weights are drawn as
OPT initializes them (normal, std 0.02; layer norms 1, biases 0), so activations have realistic
magnitudes; the text such a model writes is noise, which is all a throughput benchmark needs.

Usage::

    python benchmarks/checkpoints.py opt-1.3b                      # bf16, in the cache directory
    python benchmarks/checkpoints.py opt-6.7b opt-13b --dtype float16 --dir /nvme/ckpts
    python benchmarks/checkpoints.py opt-6.7b --dtype float16 --device cuda   # drawn on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM, PretrainedConfig

from hf_flexoffload.assets.toy import OPT_125M
from hf_flexoffload.planning.hardware import default_cache_dir

# (hidden, layers, heads, ffn) of the public facebook/opt-* checkpoints.
_SHAPES = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-tiny": (64, 2, 4, 256),  # not public: for testing the scripts quickly
}
SHARD_BYTES = 2 << 30


def opt_config(name: str) -> OPTConfig:
    """The public ``facebook/<name>`` configuration (opt-350m keeps its 512-dim projections and
    post-layer-norm)."""
    if name not in _SHAPES:
        raise ValueError(f"Unknown OPT shape {name!r}; choose one of {', '.join(_SHAPES)}.")
    hidden, layers, heads, ffn = _SHAPES[name]
    kwargs = dict(
        OPT_125M,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        word_embed_proj_dim=hidden,
    )
    if name == "opt-350m":
        kwargs.update(word_embed_proj_dim=512, do_layer_norm_before=False)
    return OPTConfig(**kwargs)


def checkpoint_name(model: str, dtype: str, scale: float = 1.0) -> str:
    """The folder name of a random checkpoint: the shape, the dtype, and the weight scale
    when it is not OPT's own (so differently drawn checkpoints never share a folder)."""
    return f"{model}-{dtype}" if scale == 1.0 else f"{model}-{dtype}-x{scale:g}"


def _random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, gen, scale: float = 1.0
) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if "layer_norm" in name or name.endswith("norm.weight"):  # layer-norm / RMSNorm scales
        return torch.ones(shape, dtype=dtype)
    # Drawn where the generator is (a GPU draws opt-6.7b's 6.7e9 numbers in well under a
    # second, one CPU thread in minutes), saved from RAM.
    std = 0.02 * scale
    return (torch.randn(shape, generator=gen, device=gen.device) * std).to(dtype).cpu()


def write_random_checkpoint(
    path: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    scale: float = 1.0,
    tensors: dict[str, tuple[int, ...]] | None = None,
) -> str:
    """Write a random ``config`` checkpoint at ``path`` (sharded safetensors + config) once.

    Built under a temporary name and renamed at the end, so an interrupted build is never used.
    ``device`` is where the numbers are drawn (the same seed draws other numbers on a GPU).
    ``scale`` multiplies the matrices' std (0.02): larger weights give greedy decoding larger
    top-1/top-2 logit gaps, so a comparison of tokens is not decided by near-ties that kernel
    differences flip (the golden tests scale their random weights for the same reason); name
    the folder with ``checkpoint_name``. ``tensors`` (name: shape, in the order written) are
    the checkpoint's tensors when they are not OPT's (e.g. Mixtral's per-expert hub names).

    Returns:
        ``path``.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    names = dict(tensors) if tensors is not None else _opt_tensors(config)
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator(device=device).manual_seed(seed)
    written: list[tuple[str, list[str]]] = []  # (provisional file, its tensors)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, shape in names.items():
        tensor = _random_tensor(name, shape, dtype, gen, scale)
        nbytes = tensor.numel() * dtype.itemsize
        if shard and size + nbytes > SHARD_BYTES:  # write full shards: one in RAM at a time
            written.append(_save_shard(tmp, len(written), shard))
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    written.append(_save_shard(tmp, len(written), shard))
    _write_index(tmp, written)
    config.dtype = dtype
    config.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.replace(tmp, path)
    return path


def _opt_tensors(config: OPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        names = {n: tuple(t.shape) for n, t in OPTForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)  # transformers saves a tied head once
    return names


def _save_shard(directory: str, i: int, shard: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    file = f"part-{i:05d}.safetensors"
    save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    return file, list(shard)


def _write_index(directory: str, written: list[tuple[str, list[str]]]) -> None:
    """Name the shards k-of-n as transformers does and map every tensor to its file."""
    weight_map, total_size = {}, 0
    for k, (file, names) in enumerate(written, start=1):
        final = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(directory, file), os.path.join(directory, final))
        total_size += os.path.getsize(os.path.join(directory, final))
        weight_map.update(dict.fromkeys(names, final))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=list(_SHAPES), metavar="NAME")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--dir", default=default_cache_dir(), help="where checkpoints go")
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    args = parser.parse_args(argv)
    for name in args.names:
        path = os.path.join(args.dir, f"{name}-{args.dtype}")
        print(f"{name}: building {path} ...", flush=True)
        dtype = getattr(torch, args.dtype)
        write_random_checkpoint(path, opt_config(name), dtype, device=args.device)
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
