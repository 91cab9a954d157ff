"""``run_batch_job``: the requests of a batch file through one model, block by block, durably.

Requests that generate alike (the same options) are sorted by prompt length and cut into
blocks of the policy's size (rows: ``n`` per request), so every weight load serves a full block
of similar-length, left-padded prompts; blocks run longest first, so one that does not fit
fails at once. A sampled request with a ``seed`` runs alone, as ``torch.manual_seed(seed);
model.generate(...)``, so it is reproducible whatever else the file holds.

Each finished block's result lines are appended to the output file and fsynced before the
next block starts; at the end the file is rewritten in input order (line order of the input
file). The job's identity, lock and stats live beside it in ``<output stem>.job/`` (the rules
and lock of ``eval``'s run directory), so ``resume=True`` skips the requests already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteriaList

from .batch_requests import CHAT, BadLine, BatchRequest, GenerationOptions
from .generation import StopSequences, _pad_id, _tokens_up_to, truncate_at_stop
from .identity import model_identity, options_identity, tokenizer_identity
from .rundir import RecordWriter, RunDirectory, read_records

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8  # for models without an offload policy (stock transformers)


def _digest(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


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
    if config is not None:
        out["model"] = model_identity(config, model_path)
    if tokenizer is not None:
        out["tokenizer"] = tokenizer_identity(tokenizer)
    if model is not None:
        out["options"] = options_identity(model)
    return out


def plan_blocks(requests: Sequence[BatchRequest], block_size: int) -> list[list[BatchRequest]]:
    """Blocks of requests that generate alike, at most ``block_size`` rows each (``n`` rows
    for a sampled request; a larger one alone), longest prompts first; a seeded sampled
    request alone."""
    groups: dict[Any, list[BatchRequest]] = {}
    blocks: list[list[BatchRequest]] = []
    for r in requests:
        if r.options.sampling and r.options.seed is not None:
            blocks.append([r])
        else:
            groups.setdefault(_group_key(r.options), []).append(r)
    for group in groups.values():
        group = sorted(group, key=lambda r: -len(r.prompt_ids))  # stable: ties in input order
        block: list[BatchRequest] = []
        for r in group:
            if block and sum(_rows(x) for x in block) + _rows(r) > block_size:
                blocks.append(block)
                block = []
            block.append(r)
        blocks.append(block)
    return sorted(blocks, key=lambda b: -max(len(r.prompt_ids) for r in b))


def _rows(request: BatchRequest) -> int:
    """Rows a request takes in a block: ``n`` sampled, one greedy (its copies are equal)."""
    return request.options.n if request.options.sampling else 1


def _group_key(options: GenerationOptions) -> tuple:
    data = options.to_dict()
    if not options.sampling:  # greedy: sampling knobs change nothing
        data.update(top_p=1.0, seed=None, temperature=0.0)
    return tuple(sorted((k, json.dumps(v)) for k, v in data.items()))


def generation_kwargs(options: GenerationOptions, pad_token_id: int) -> dict[str, Any]:
    """The ``generate`` arguments of a request's options (stop sequences aside)."""
    sampling = options.sampling
    return {
        "max_new_tokens": options.max_tokens,
        "do_sample": sampling,
        "temperature": options.temperature if sampling else None,
        "top_p": options.top_p if sampling else None,
        "top_k": None,
        "num_return_sequences": options.n if sampling else 1,
        "pad_token_id": pad_token_id,
    }


@dataclass(frozen=True)
class Completion:
    """One generated choice: its text (cut before a stop sequence), tokens and why it ended."""

    text: str
    tokens: int
    finish_reason: str


def generate_requests(model, tokenizer, block: Sequence[BatchRequest]) -> list[list[Completion]]:
    """Generate one block (requests sharing their options): ``n`` completions per request
    (greedy ones generated once and repeated, as ``generate`` refuses ``n > 1`` greedily)."""
    options = block[0].options
    pad = _pad_id(model, tokenizer)
    length = max(len(r.prompt_ids) for r in block)
    ids = torch.full((len(block), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(block):  # left padding: the prompts' ends aligned
        ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, length - len(r.prompt_ids) :] = 1
    criteria = StoppingCriteriaList()
    if options.stop:
        criteria.append(StopSequences(tokenizer, options.stop, length))
    if options.sampling and options.seed is not None:
        torch.manual_seed(options.seed)
    out = model.generate(
        ids, attention_mask=mask, stopping_criteria=criteria, **generation_kwargs(options, pad)
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = [_completion(tokenizer, row, options, eos) for row in out[:, length:]]
    if not options.sampling:
        return [[row] * options.n for row in rows]
    return [rows[i * options.n : (i + 1) * options.n] for i in range(len(block))]


def _completion(tokenizer, row: torch.Tensor, options: GenerationOptions, eos: set) -> Completion:
    tokens = row.tolist()
    ended = next((i for i, t in enumerate(tokens) if t in eos), None)
    if ended is not None:
        tokens = tokens[: ended + 1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = truncate_at_stop(text, options.stop)
    if cut != text:
        return Completion(cut, _tokens_up_to(tokenizer, torch.tensor(tokens), cut), "stop")
    reason = "stop" if ended is not None or len(tokens) < options.max_tokens else "length"
    return Completion(text, len(tokens), reason)


def result_line(request: BatchRequest, completions: Sequence[Completion], model_name: str):
    """The OpenAI Batch output line of a request."""
    chat = request.url == CHAT
    choices = []
    for i, c in enumerate(completions):
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice.update(logprobs=None, finish_reason=c.finish_reason)
        choices.append(choice)
    prompt, generated = len(request.prompt_ids), sum(c.tokens for c in completions)
    key = _digest(request.custom_id)
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{key}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
        },
    }
    return {
        "id": f"batch_req_{key}",
        "custom_id": request.custom_id,
        "response": {"status_code": 200, "request_id": key, "body": body},
        "error": None,
    }


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
