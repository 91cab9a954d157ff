"""Perplexity over a long text in overlapping windows, for ``quality.py``: the windows, and
the summed NLL of a window computed through a model's KV cache (offloaded or stock)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hf_flexoffload.modeling.cache_keyword import CACHE_KEYWORD, cache_from_output


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, first, end)`` per window over ``n`` tokens: the window's inputs are tokens
    ``[begin, end - 1)``, and it scores targets ``[first, end)``, each predicted from every token
    before it within the window. Every token but the first is scored exactly once, with at
    least ``window - stride`` tokens of context once the text allows."""
    first = 1  # the first token has nothing to be predicted from
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        if end > first:
            yield begin, first, end
        first = end
        if end == n:
            return


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    window: int,
    stride: int,
    chunk: int,
    batch: int,
    progress: bool = False,
):
    """(perplexity, scored tokens) of ``model`` over the 1-D token ids ``ids``.

    Windows with the same shape (all but the first and last) run ``batch`` at a time.
    """
    spans: dict[tuple[int, int], list[int]] = {}
    for begin, first, end in windows(len(ids), window, stride):
        spans.setdefault((first - 1 - begin, end - first), []).append(begin)
    nll, count = 0.0, 0
    bar = tqdm(total=len(ids) - 1, unit="tok", desc="perplexity", disable=not progress)
    for (context, scored), begins in spans.items():
        for i in range(0, len(begins), batch):
            rows = torch.stack([ids[b : b + context + scored + 1] for b in begins[i : i + batch]])
            rows = rows.to(model.device)
            nll += _window_nll(model, rows, context, chunk)
            count += rows.shape[0] * scored
            bar.update(rows.shape[0] * scored)
    bar.close()
    return math.exp(nll / count), count


def _window_nll(model, rows: torch.Tensor, context: int, chunk: int) -> float:
    """Summed NLL of the targets ``rows[:, context + 1:]``, each given every token before it
    in its row: the first ``context`` tokens go into the KV cache in one forward, the rest
    follow ``chunk`` at a time, each predicting the next."""
    cache, total = None, 0.0
    try:
        if context:
            out = model(input_ids=rows[:, :context], use_cache=True, logits_to_keep=1)
            cache = cache_from_output(out)
        for start in range(context, rows.shape[1] - 1, chunk):
            stop = min(start + chunk, rows.shape[1] - 1)
            out = model(input_ids=rows[:, start:stop], use_cache=True, **{CACHE_KEYWORD: cache})
            cache = cache_from_output(out)
            logits = out.logits.float()
            targets = rows[:, start + 1 : stop + 1]
            total += float(
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            )
    finally:
        if hasattr(cache, "close"):
            cache.close()  # the offloaded cache holds buffers (and maybe files) until closed
    return total
