"""Running one block of prompts through a model: generate and cut at stop sequences, or score
the choices of multiple-choice instances by log-likelihood.

Works with any transformers causal LM: the offloaded models and stock ones alike, which is how
the tests check that evaluation through offloading changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from .scenario import ScenarioSpec, continuation


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the stop sequences."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class StopSequences(StoppingCriteria):
    """Marks a row done once its generated text contains any stop sequence.

    Decodes only the new tokens, so a stop sequence inside the prompt never ends generation,
    and one spread over several tokens is found as soon as its last token appears.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :], skip_special_tokens=True
        )
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextmanager
def _left_padding(tokenizer):
    # Decoder-only generation needs the prompts' ends aligned.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _pad_id(model, tokenizer) -> int:
    for value in (tokenizer.pad_token_id, model.config.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    raise ValueError("The tokenizer has no pad or eos token; set tokenizer.pad_token.")


def generate_block(
    model, tokenizer, prompts: Sequence[str], spec: ScenarioSpec, extra_criteria=()
) -> tuple[list[str], list[int], list[int]]:
    """Generate completions for one block of prompts.

    Returns:
        (completions cut at the first stop sequence, prompt tokens per row, generated tokens
        per row counted up to the cut).
    """
    with _left_padding(tokenizer):
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_len = input_ids.shape[1]
    criteria = StoppingCriteriaList(extra_criteria)
    if spec.stop:
        criteria.append(StopSequences(tokenizer, spec.stop, prompt_len))
    sampling = spec.temperature > 0
    out = model.generate(
        input_ids,
        attention_mask=mask,
        max_new_tokens=spec.max_new_tokens,
        do_sample=sampling,
        temperature=spec.temperature if sampling else None,
        top_p=None,
        top_k=None,
        pad_token_id=_pad_id(model, tokenizer),
        stopping_criteria=criteria,
    )
    completions, generated = [], []
    for row in out[:, prompt_len:]:
        text = tokenizer.decode(row, skip_special_tokens=True)
        cut = truncate_at_stop(text, spec.stop)
        completions.append(cut)
        generated.append(_tokens_up_to(tokenizer, row, cut))
    return completions, [int(n) for n in mask.sum(dim=1)], generated


def _tokens_up_to(tokenizer, row: torch.Tensor, text: str) -> int:
    """How many generated tokens it took to produce ``text`` (the rest were past a stop)."""
    ids = [t for t in row.tolist() if t not in tokenizer.all_special_ids]
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) >= len(text):
            return n
    return len(ids)


@torch.no_grad()
def choice_logprobs(
    model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens following its prompt.

    All (prompt, choice) pairs of the block go through one forward pass of the model, so an
    offloaded model streams its weights once for the whole block.
    """
    pairs = [(p, c) for p, cs in zip(prompts, choices, strict=True) for c in cs]
    contexts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p, _ in pairs]
    fulls = [
        tokenizer(p + continuation(p, c), add_special_tokens=True)["input_ids"] for p, c in pairs
    ]
    length = max(len(f) for f in fulls)
    pad = _pad_id(model, tokenizer)
    ids = torch.full((len(pairs), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, full in enumerate(fulls):
        ids[i, length - len(full) :] = torch.tensor(full)
        mask[i, length - len(full) :] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1)  # (n, S - 1, vocab): predicts token t + 1
    targets = logprobs.gather(-1, ids[:, 1:, None])[..., 0]  # (n, S - 1)
    scores = []
    for i, (context, full) in enumerate(zip(contexts, fulls, strict=True)):
        # The choice's tokens are those after the prompt's; tokenizers may merge across the
        # boundary, so count from the shared prefix.
        shared = _common_prefix(context, full)
        first = length - len(full) + max(shared, 1)
        scores.append(float(targets[i, first - 1 :].sum()))
    out, k = [], 0
    for cs in choices:
        out.append(scores[k : k + len(cs)])
        k += len(cs)
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
