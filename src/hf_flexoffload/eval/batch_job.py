"""``run_batch_job``: the requests of a batch file through one model, block by block, durably.

Requests that generate alike (greedy, or sampled with the same temperature, top_p and ``n``;
``max_tokens`` and stop sequences end each row on its own) are sorted by prompt length and cut
into blocks of the policy's size (rows: ``n`` per sampled request), so every weight load serves
a full block of similar-length, left-padded prompts; blocks run longest first, so one that does
not fit fails at once. A sampled request with a ``seed`` runs alone, as ``torch.manual_seed(seed);
model.generate(...)``, so it is reproducible whatever else the file holds.

Each finished block's result lines are appended to the output file and fsynced before the
next block starts; at the end the file is rewritten in input order (line order of the input
file). The job's identity, lock and stats live beside it in ``<output stem>.job/`` (the rules
and lock of ``eval``'s run directory), so ``resume=True`` skips the requests already written.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch_generation import _digest, generate_requests, plan_blocks, result_line
from .batch_requests import BadLine, BatchRequest
from .identity import model_sections
from .rundir import RecordWriter, RunDirectory, read_records

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8  # for models without an offload policy (stock transformers)


class JobDirectory(RunDirectory):
    """The state of a job writing ``output``: ``<output stem>.job/`` holds ``run_spec.json``,
    ``.lock`` and ``stats.json``; the finished records are the output file's lines."""

    def __init__(self, output: str) -> None:
        stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
        super().__init__(stem + ".job")
        self.output = output
        self.errors = stem + ".errors.jsonl"

    def records(self) -> list[dict]:
        return read_records(self.output)

    def check(self, spec: dict[str, Any], resume: bool) -> None:
        """``RunDirectory.check``; an output file that no job wrote is refused too."""
        if not os.path.exists(self.file("run_spec.json")) and _size(self.output):
            raise FileExistsError(
                f"{self.output} exists and was not written by a batch job: delete it or choose "
                "another --output."
            )
        super().check(spec, resume)


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def job_identity(
    requests: Sequence[BatchRequest],
    bad: Sequence[BadLine],
    model_name: str,
    *,
    seed: int | None = None,
    config=None,
    model_path: str | None = None,
    tokenizer=None,
    model=None,
) -> dict[str, Any]:
    """The job's identity, compared on resume by ``eval``'s rules (``identity.differences``):
    the requests as read (ids, token ids, resolved options) and the bad lines, the model's
    config and weight files, the tokenizer, the compute options. Sections whose inputs are not
    given are left out (and not compared)."""
    out: dict[str, Any] = {"model_name": model_name, "job": {"command": "generate", "seed": seed}}
    out["dataset"] = _digest(
        [[r.custom_id, r.url, r.prompt_ids, r.options.to_dict()] for r in requests]
        + [b.to_dict() for b in bad]
    )
    return {**out, **model_sections(config, model_path, tokenizer, model)}


@dataclass(frozen=True)
class BlockDone:
    """What ``on_block`` hears after each block: requests and tokens of the block, seconds."""

    requests: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class BatchJobResult:
    """What a batch job produced.

    Attributes:
        output: The output file (every finished request, in input order).
        errors: The errors file (one line per bad input line), or None when there were none.
        stats: Everything in ``stats.json``: requests, bad lines, tokens, model time,
            throughput, policy, peak memory.
    """

    output: str
    errors: str | None
    stats: dict[str, Any] = field(repr=False)


def run_batch_job(
    model,
    tokenizer,
    requests: Sequence[BatchRequest],
    output: str,
    *,
    bad_lines: Sequence[BadLine] = (),
    resume: bool = False,
    block_size: int | None = None,
    model_name: str | None = None,
    seed: int | None = None,
    on_block: Callable[[BlockDone], None] | None = None,
) -> BatchJobResult:
    """Run the requests of a batch file (``batch_requests.read_requests``) into ``output``.

    Args:
        model: A causal LM: an offloaded model (blocks follow its policy) or a stock one.
        tokenizer: Its tokenizer.
        requests: The runnable requests, in input order.
        output: The output JSON-lines file (OpenAI Batch output format).
        bad_lines: The lines that do not run: written to ``<output stem>.errors.jsonl``.
        resume: Continue a job that wrote ``output``, skipping its finished requests.
        block_size: Rows per ``generate`` call; default: the offload policy's block size.
        model_name: The ``model`` of each response (default: the model's ``name_or_path``).
        seed: Seeds torch's random state once, before the first block (unseeded sampled
            requests draw from it).
        on_block: Called after each block is written (the CLI's progress bar).

    Returns:
        A ``BatchJobResult``.

    Raises:
        ValueError: ``output`` holds another job (naming what changed).
        FileExistsError: It holds finished requests of this job and ``resume`` is off.
        RunInUseError: Another process is writing it.
    """
    start = time.perf_counter()
    policy = getattr(model, "offload_policy", None)
    block = block_size or (policy.block_size if policy is not None else DEFAULT_BLOCK_SIZE)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}.")
    path = getattr(model.config, "name_or_path", "")
    model_name = model_name or path
    identity = job_identity(
        requests, bad_lines, model_name, seed=seed, config=model.config, model_path=path,
        tokenizer=tokenizer, model=model,
    )  # fmt: skip
    job = JobDirectory(output)
    job.lock()
    try:
        job.prepare(identity, resume)
        write_lines(job.errors, [b.to_dict() for b in bad_lines])
        done = {r["custom_id"] for r in job.records()}
        todo = [r for r in requests if r.custom_id not in done]
        logger.info("%s: %d requests, %d finished, %d bad lines, blocks of %d rows",
                    output, len(requests), len(done), len(bad_lines), block)  # fmt: skip
        if seed is not None:
            torch.manual_seed(seed)
        session, peak = {"tokens": 0, "seconds": 0.0}, {}
        _run_blocks(model, tokenizer, todo, block, job, model_name, on_block, session, peak)
        order = {r.custom_id: i for i, r in enumerate(requests)}
        records = sorted(job.records(), key=lambda r: order.get(r["custom_id"], len(order)))
        write_lines(output, records)
        stats = _stats(records, bad_lines, model, time.perf_counter() - start, session, peak)
        stats["resumed_requests"] = len(done)
        job.write_stats(stats)
    finally:
        job.unlock()
    return BatchJobResult(output=output, errors=job.errors if bad_lines else None, stats=stats)


def _run_blocks(model, tokenizer, todo, block, job, model_name, on_block, done, peak) -> None:
    """Generate and append every block, counting this session's tokens and model seconds in
    ``done`` and the largest bytes per tier the model held in ``peak``."""
    with RecordWriter(job.output) as writer:
        for chunk in plan_blocks(todo, block):
            began = time.perf_counter()
            completions = generate_requests(model, tokenizer, chunk)
            elapsed = time.perf_counter() - began
            lines = [result_line(r, c, model_name) for r, c in zip(chunk, completions, strict=True)]
            writer.append(lines)
            tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
            done.update(tokens=done["tokens"] + tokens, seconds=done["seconds"] + elapsed)
            stats = getattr(model, "generation_stats", None)
            for tier, size in (stats.peak_bytes if stats is not None else {}).items():
                peak[tier] = max(peak.get(tier, 0), size)
            if on_block is not None:
                on_block(BlockDone(requests=len(chunk), tokens=tokens, seconds=elapsed))


def write_lines(path: str, records: Sequence[dict]) -> None:
    """Write a JSON-lines file atomically (an empty list removes it)."""
    if not records:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stats(records, bad_lines, model, wall, session, peak) -> dict[str, Any]:
    usage = [r["response"]["body"]["usage"] for r in records]
    seconds = session["seconds"]
    policy = getattr(model, "offload_policy", None)
    return {
        "requests": len(records),
        "bad_lines": len(bad_lines),
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
        "completion_tokens_this_session": session["tokens"],
        "model_seconds_this_session": seconds,  # in generate, not loading or writing
        "completion_tokens_per_second": session["tokens"] / seconds if seconds else 0.0,
        "wall_seconds_this_session": wall,
        "policy": policy.to_dict() if policy is not None else None,
        "peak_bytes": peak,  # the model's own buffers per tier, the largest of any block
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
