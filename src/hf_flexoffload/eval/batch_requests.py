"""The requests of a batch job: one JSON line each, read and checked before anything generates.

Two forms of line are read:

* the OpenAI Batch API's: ``{"custom_id": "r1", "method": "POST", "url": "/v1/completions",
  "body": {"prompt": "...", "max_tokens": 16}}``, or ``"url": "/v1/chat/completions"`` with
  ``"body": {"messages": [{"role": "user", "content": "..."}]}`` (rendered through the
  tokenizer's chat template, with the generation prompt);
* plain ``{"prompt": "...", ...}`` lines, options beside the prompt; ``custom_id`` is optional
  (default ``line-<n>``).

A line that cannot be run (invalid JSON, a missing field, a bad option, a duplicate
``custom_id``, a prompt too long for the model) becomes a ``BadLine`` with its line number and
``custom_id``; the other lines still run (the OpenAI batch behaviour).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OPTIONS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n")
# Accepted and not used: they change nothing about the tokens (one model serves the job).
_IGNORED = ("model", "user", "metadata")
# Accepted when off (null, false, 0): what they ask for is not produced.
_OFF_ONLY = ("stream", "logprobs", "top_logprobs", "echo")
_ALIASES = {"max_completion_tokens": "max_tokens"}
MAX_STOP = 4  # as the OpenAI API


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How one request generates: the OpenAI body's options, or the job's defaults.

    Args:
        max_tokens: New tokens at most (>= 1).
        temperature: 0 is greedy decoding; above 0 samples (at most 2, as the OpenAI API).
        top_p: Nucleus sampling mass, in (0, 1]; 1 is off.
        seed: Makes a sampled request reproducible on its own: it runs as
            ``torch.manual_seed(seed); model.generate(...)`` on that request alone (its own
            block). None: sampled with the job's random state, batched with its peers.
        stop: Up to 4 stop sequences; the text is cut before the first one found.
        n: Completions to return (``num_return_sequences``).

    Raises:
        ValueError: An option out of range, saying which and what is allowed.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: must be {rule}.")

        if _not_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if _not_number(self.temperature) or not 0 <= self.temperature <= 2:
            raise bad("temperature", "a number from 0 (greedy) to 2")
        if _not_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if self.seed is not None and _not_int(self.seed):
            raise bad("seed", "an integer or null")
        if _not_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a non-empty string or a list of them")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"at most {MAX_STOP} sequences")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True, kw_only=True)
class BatchRequest:
    """One runnable line of the input.

    Attributes:
        line: Its 1-based line number in the input file.
        custom_id: The caller's id (``line-<n>`` for a plain line without one).
        url: ``/v1/completions`` or ``/v1/chat/completions`` (plain lines are completions).
        prompt_ids: The prompt's token ids, as ``tokenizer(prompt)`` gives them (a chat's
            rendered template without adding special tokens twice).
        options: How it generates.
    """

    line: int
    custom_id: str
    url: str
    prompt_ids: tuple[int, ...]
    options: GenerationOptions


@dataclass(frozen=True, kw_only=True)
class BadLine:
    """A line that does not run, and why (a line of the errors file)."""

    line: int
    custom_id: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_requests(
    path: str, tokenizer, defaults: GenerationOptions, *, max_positions: int | None = None
) -> tuple[list[BatchRequest], list[BadLine]]:
    """Read a batch file: the runnable requests in input order, and the bad lines.

    Args:
        path: A JSON-lines file (blank lines are skipped).
        tokenizer: The model's tokenizer (chat requests need its chat template).
        defaults: Options for what a request's body does not set.
        max_positions: The model's positions: a prompt plus ``max_tokens`` beyond them is a
            bad line.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not one request could be read (the file is empty).
    """
    requests: list[BatchRequest] = []
    bad: list[BadLine] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            custom_id = None
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise ValueError("a line must be a JSON object")
                custom_id = _custom_id(data, number)
                if custom_id in seen:
                    raise ValueError(f"duplicate custom_id {custom_id!r}: ids must be unique")
                request = _request(data, number, custom_id, tokenizer, defaults)
                total = len(request.prompt_ids) + request.options.max_tokens
                if max_positions is not None and total > max_positions:
                    raise ValueError(
                        f"the prompt's {len(request.prompt_ids)} tokens plus max_tokens="
                        f"{request.options.max_tokens} exceed the model's {max_positions} "
                        "positions: shorten the prompt or lower max_tokens"
                    )
            except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                bad.append(BadLine(line=number, custom_id=custom_id, error=str(err)))
                continue
            seen.add(custom_id)
            requests.append(request)
    if not requests and not bad:
        raise ValueError(f"{path} has no requests (it is empty).")
    return requests, bad


def _custom_id(data: dict, number: int) -> str:
    if "custom_id" not in data:
        if "body" in data:
            raise ValueError("'custom_id' is missing")
        return f"line-{number}"
    if not isinstance(data["custom_id"], str) or not data["custom_id"]:
        raise ValueError(f"custom_id={data['custom_id']!r}: must be a non-empty string")
    return data["custom_id"]


def _request(data: dict, number: int, custom_id: str, tokenizer, defaults) -> BatchRequest:
    if "body" in data:  # the OpenAI Batch form
        if data.get("method", "POST") != "POST":
            raise ValueError(f"method={data['method']!r}: only POST is supported")
        url = data.get("url")
        if url not in (COMPLETIONS, CHAT):
            raise ValueError(f"url={url!r}: must be {COMPLETIONS!r} or {CHAT!r}")
        body = data["body"]
        if not isinstance(body, dict):
            raise ValueError("'body' must be a JSON object")
    else:  # a plain line: the prompt and options at the top level
        url, body = COMPLETIONS, {k: v for k, v in data.items() if k != "custom_id"}
    if url == CHAT:
        ids = _chat_ids(body, tokenizer)
        body = {k: v for k, v in body.items() if k != "messages"}
    else:
        ids = _prompt_ids(body, tokenizer)
        body = {k: v for k, v in body.items() if k != "prompt"}
    options = _options(body, defaults)
    return BatchRequest(
        line=number, custom_id=custom_id, url=url, prompt_ids=tuple(ids), options=options
    )


def _prompt_ids(body: dict, tokenizer) -> list[int]:
    if "prompt" not in body:
        raise ValueError("'prompt' is missing")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        ids = list(prompt)  # token ids, as the completions API accepts
    else:
        raise ValueError(
            "'prompt' must be a string or a list of token ids (one prompt per request: put "
            "each prompt of a list on its own line)"
        )
    if not ids:
        raise ValueError("'prompt' is empty")
    top = max(ids)
    if top >= len(tokenizer) or min(ids) < 0:
        raise ValueError(f"token id {top} is outside the tokenizer's {len(tokenizer)} tokens")
    return ids


def _chat_ids(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is missing or not a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message must be an object with 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template: use /v1/completions with a prompt, or pass "
            "a --tokenizer that has one"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _options(body: dict, defaults: GenerationOptions) -> GenerationOptions:
    given: dict[str, Any] = {}
    for key, value in body.items():
        key = _ALIASES.get(key, key)
        if key in OPTIONS:
            if value is not None:
                given[key] = value
        elif key in _OFF_ONLY:
            if value:
                raise ValueError(f"{key}={value!r}: not supported by a batch job; remove it")
        elif key not in _IGNORED:
            raise ValueError(
                f"unsupported option {key!r} (supported: {', '.join(OPTIONS)}); remove it"
            )
    values = {**asdict(defaults), **given}
    return GenerationOptions(**values)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _not_int(value: Any) -> bool:
    return not _is_token(value)


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int | float) or value != value
