"""One block of a batch job through a model: which requests share a block, the ``generate``
call, and the OpenAI Batch output line of each request.

Works with any transformers causal LM (the offloaded models and stock ones alike), which is how
the tests check that a job's tokens are ``generate``'s on the same requests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .batch_requests import CHAT, BatchRequest, GenerationOptions
from .generation import _pad_id, _tokens_up_to, truncate_at_stop


def _digest(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


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
    """What one ``generate`` call shares: greedy decoding (every greedy request: ``n``
    copies of one row, and ``max_tokens`` and ``stop`` end each row on its own), or the
    sampling knobs and ``n``."""
    if not options.sampling:
        return ("greedy",)
    return ("sample", options.temperature, options.top_p, options.n)


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


class _RowLimits(StoppingCriteria):
    """Ends each row at its own request's ``max_tokens`` or stop sequences, so requests that
    differ only in those share a block (a row that is done is padded while the rest go on;
    its tokens up to there are those it would get alone)."""

    def __init__(self, tokenizer, rows: Sequence[GenerationOptions], prompt_len: int) -> None:
        self.tokenizer, self.rows, self.prompt_len = tokenizer, list(rows), prompt_len
        self.stops = any(o.stop for o in self.rows)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids.shape[1] - self.prompt_len
        done = [new >= o.max_tokens for o in self.rows]
        if self.stops:
            texts = self.tokenizer.batch_decode(
                input_ids[:, self.prompt_len :], skip_special_tokens=True
            )
            done = [d or any(s in t for s in o.stop)
                    for d, t, o in zip(done, texts, self.rows, strict=True)]  # fmt: skip
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_requests(model, tokenizer, block: Sequence[BatchRequest]) -> list[list[Completion]]:
    """Generate one block (requests sharing their sampling options; ``max_tokens`` and ``stop``
    per row): ``n`` completions per request (greedy ones generated once and repeated, as
    ``generate`` refuses ``n > 1`` greedily)."""
    options = block[0].options
    pad = _pad_id(model, tokenizer)
    length = max(len(r.prompt_ids) for r in block)
    ids = torch.full((len(block), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(block):  # left padding: the prompts' ends aligned
        ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, length - len(r.prompt_ids) :] = 1
    copies = options.n if options.sampling else 1  # rows per request
    rows = [r.options for r in block for _ in range(copies)]
    kwargs = generation_kwargs(options, pad)
    kwargs["max_new_tokens"] = max(o.max_tokens for o in rows)
    if options.sampling and options.seed is not None:
        torch.manual_seed(options.seed)
    limits = StoppingCriteriaList([_RowLimits(tokenizer, rows, length)])
    out = model.generate(ids, attention_mask=mask, stopping_criteria=limits, **kwargs)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    done = [
        _completion(tokenizer, row, o, eos) for row, o in zip(out[:, length:], rows, strict=True)
    ]
    if not options.sampling:
        return [[c] * r.options.n for c, r in zip(done, block, strict=True)]
    return [done[i * copies : (i + 1) * copies] for i in range(len(block))]


def _completion(tokenizer, row: torch.Tensor, options: GenerationOptions, eos: set) -> Completion:
    tokens = row.tolist()[: options.max_tokens]  # past it: padding, while other rows went on
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
