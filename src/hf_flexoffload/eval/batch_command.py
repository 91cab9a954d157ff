"""``hf-flexoffload generate``: the command-line face of ``run_batch_job``.

The requests are read and checked (and the output checked against the job it holds) before the
model is loaded; bad lines are printed with their line number and ``custom_id``, written to the
errors file, and the job goes on without them. A progress bar shows requests, tokens/s and the
time left; a summary follows.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from ..checkpoints.hub import resolve_pretrained
from ..config.counters import human_bytes
from ..config.workload import Workload
from ..modeling.auto import AutoFlexOffloadModelForCausalLM
from ..storage.transfer import resolve_device
from .batch_job import BlockDone, JobDirectory, job_identity, run_batch_job, write_lines
from .batch_requests import BadLine, GenerationOptions, read_requests
from .command import _unescape

SHOWN_BAD_LINES = 20


def run(args: argparse.Namespace) -> int:
    try:
        defaults = GenerationOptions(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=tuple(_unescape(s) for s in args.stop or ()),
            n=args.n,
        )
    except ValueError as err:  # the flags' names: --top-p for top_p
        raise ValueError(f"--{str(err).replace('_', '-')}") from None
    path = resolve_pretrained(args.model, revision=args.revision, tokenizer=not args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or path)
    config = AutoConfig.from_pretrained(path)
    positions = getattr(config, "max_position_embeddings", None)
    requests, bad = read_requests(args.input, tokenizer, defaults, max_positions=positions)
    _report(bad, JobDirectory(args.output).errors)
    if not requests:
        write_lines(JobDirectory(args.output).errors, [b.to_dict() for b in bad])
        raise ValueError(f"{args.input}: no line can run ({len(bad)} bad lines, listed above).")
    _check_vocabulary(requests, tokenizer, config)
    job = JobDirectory(args.output)
    identity = job_identity(requests, bad, args.model, seed=args.seed, config=config,
                            model_path=path, tokenizer=tokenizer)  # fmt: skip
    job.check(identity, args.resume)  # before loading: another job, or finished and no --resume
    job.lock()
    try:
        finished = len(job.records()) if args.resume else 0
        workload = Workload(
            prompt_len=max(len(r.prompt_ids) for r in requests),
            gen_len=max(r.options.max_tokens for r in requests),
        )
        with AutoFlexOffloadModelForCausalLM.from_pretrained(
            path,
            offload_policy=args.offload_policy,
            offload_dir=args.offload_dir,
            device=resolve_device(args.device),
            dtype=args.dtype,
            max_memory=args.parse_max_memory(args.max_memory) or None,
            workload=workload,
        ) as model:
            bar = _progress(len(requests), finished, disable=args.no_progress)
            try:
                result = run_batch_job(
                    model, tokenizer, requests, args.output, bad_lines=bad,
                    resume=args.resume, block_size=args.block_size, model_name=args.model,
                    seed=args.seed, on_block=bar,
                )  # fmt: skip
            finally:
                bar.close()
    finally:
        job.unlock()
    print(summary(result.stats, result.output, result.errors))
    return 0


class _progress:
    """A tqdm bar of requests, with the session's tokens/s (its ETA is tqdm's)."""

    def __init__(self, total: int, finished: int, disable: bool) -> None:
        self.bar = tqdm(total=total, initial=finished, unit="req", desc="generate",
                        disable=disable, dynamic_ncols=True)  # fmt: skip
        self.tokens, self.seconds = 0, 0.0

    def __call__(self, done: BlockDone) -> None:
        self.tokens += done.tokens
        self.seconds += done.seconds
        self.bar.update(done.requests)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}")

    def close(self) -> None:
        self.bar.close()


def _report(bad: list[BadLine], errors_path: str) -> None:
    for b in bad[:SHOWN_BAD_LINES]:
        print(f"line {b.line} (custom_id {b.custom_id!r}): {b.error}", file=sys.stderr)
    if bad:
        more = len(bad) - SHOWN_BAD_LINES
        extra = f" ({more} more not shown)" if more > 0 else ""
        print(f"{len(bad)} bad line(s) skipped{extra}; listed in {errors_path}", file=sys.stderr)


def _check_vocabulary(requests, tokenizer, config) -> None:
    top = max(max(r.prompt_ids) for r in requests)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and top >= vocab:
        raise ValueError(
            f"The tokenizer gives token id {top} but the model's vocabulary has {vocab} "
            f"entries (the tokenizer has {len(tokenizer)}): pass the model's own --tokenizer."
        )


def summary(stats: dict, output: str, errors: str | None) -> str:
    """A few lines of what ``stats.json`` holds."""
    lines = [
        f"{stats['requests']} requests ({stats['resumed_requests']} from before --resume), "
        f"{stats['bad_lines']} bad lines",
        f"  {stats['prompt_tokens']} prompt tokens, {stats['completion_tokens']} completion "
        f"tokens; this session {stats['completion_tokens_this_session']} in "
        f"{stats['model_seconds_this_session']:.1f}s of model time "
        f"({stats['completion_tokens_per_second']:.1f} tok/s), "
        f"{stats['wall_seconds_this_session']:.1f}s in all",
    ]
    if stats.get("policy"):
        keys = ("micro_batch_size", "num_micro_batches", "weights", "cache", "overlap")
        lines.append(f"  policy {json.dumps({k: stats['policy'][k] for k in keys})}")
    peak = ", ".join(f"{t}={human_bytes(v)}" for t, v in stats["peak_bytes"].items())
    lines.append(f"  peak memory: process {human_bytes(stats['peak_rss_bytes'])} resident"
                 + (f"; model buffers {peak}" if peak else ""))  # fmt: skip
    lines.append(f"  wrote {output}" + (f" and {errors}" if errors else ""))
    return "\n".join(lines)
