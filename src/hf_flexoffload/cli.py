"""Command line: ``hf-flexoffload demo``. The only module that prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
from transformers import OPTConfig, OPTForCausalLM, StoppingCriteria, StoppingCriteriaList

from .modeling import FlexOffloadOPTForCausalLM
from .policy import Policy, Split
from .stats import human_bytes

# The public facebook/opt-125m shape.
OPT_125M = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    ffn_dim=3072,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=768,
    do_layer_norm_before=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
# The public facebook/opt-1.3b shape (benchmarks).
OPT_1_3B = {**OPT_125M, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32}
OPT_1_3B.update(ffn_dim=8192, word_embed_proj_dim=2048)


def default_cache_dir() -> str:
    """``$HF_FLEXOFFLOAD_CACHE``, else ``$XDG_CACHE_HOME/hf_flexoffload`` (``~/.cache``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("HF_FLEXOFFLOAD_CACHE") or os.path.join(xdg, "hf_flexoffload")


def build_random_checkpoint(path: str, config: OPTConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """Save a random-weight OPT checkpoint at ``path`` once; later calls reuse it.

    Written to a temporary directory first and renamed, so an interrupted build is never reused.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).to(dtype).eval()
    tmp = f"{path}.partial-{os.getpid()}"
    model.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.replace(tmp, path)
    return path


class Progress(StoppingCriteria):
    """Shows token steps and throughput while ``generate`` runs; never stops generation."""

    def __init__(self, label: str, total: int, batch: int) -> None:
        self.label, self.total, self.batch = label, total, batch
        self.step, self.start = 0, time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        rate = self.step * self.batch / (time.perf_counter() - self.start)
        end = "\n" if self.step >= self.total else ""
        print(
            f"\r  {self.label:<22} step {self.step:>3}/{self.total} {rate:8.1f} tok/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids, mask, new_tokens: int, label: str):
    progress = StoppingCriteriaList([Progress(label, new_tokens, ids.shape[0])])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=progress,
    )
    return out, time.perf_counter() - start


def demo(args: argparse.Namespace) -> int:
    """Offloaded generation on an opt-125m-shaped random model, next to stock transformers."""
    path = os.path.join(args.cache_dir, "demo-opt-125m-bf16")
    print(f"Checkpoint: {path} (random weights, opt-125m shape, bf16; built once)")
    build_random_checkpoint(path, OPTConfig(**OPT_125M), torch.bfloat16)

    policy = Policy(
        micro_batch_size=args.batch_size // 2,
        num_micro_batches=2,
        weights=Split(device=0.2, disk=0.8),
        cache=Split(device=1.0),
        overlap=True,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, OPT_125M["vocab_size"], (args.batch_size, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : args.prompt_len // 4] = 0  # left-pad every other prompt

    print(f"Policy: {policy.to_json(indent=None)}")
    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        print("Weight placement (bytes per tier):")
        print("  " + str(model.placement_report).replace("\n", "\n  "))
        print(f"Generating {args.new_tokens} tokens for {args.batch_size} prompts:")
        ours, ours_s = _generate(model, ids, mask, args.new_tokens, "hf_flexoffload")
        stats = model.generation_stats

    stock = OPTForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    theirs, theirs_s = _generate(stock, ids, mask, args.new_tokens, "transformers (in RAM)")
    tokens = args.batch_size * args.new_tokens
    same = torch.equal(ours, theirs)
    print()
    print(f"{'system':<34}{'seconds':>9}{'tok/s':>9}")
    print(f"{'hf_flexoffload (80% on disk)':<34}{ours_s:>9.2f}{tokens / ours_s:>9.1f}")
    print(f"{'transformers (everything in RAM)':<34}{theirs_s:>9.2f}{tokens / theirs_s:>9.1f}")
    moved = stats.bytes_moved
    print(
        f"Read from disk: {human_bytes(moved['disk_to_host'])}; peak in RAM: "
        f"{human_bytes(stats.peak_bytes['device'] + stats.peak_bytes['host'])}"
    )
    print(f"Same tokens as transformers: {'yes' if same else 'NO'}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-flexoffload", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offloaded generation next to stock transformers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "demo" and args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (two micro-batches)")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
