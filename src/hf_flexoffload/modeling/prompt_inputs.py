"""Prompts at the edges, checked before any work, as stock transformers treats them (or with a
clear error where stock fails from deep inside).

* An empty batch (0 sequences) is a ``ValueError``: there is nothing to generate.
* No prompt, or a zero-length one (what the text-generation pipeline sends for ``""``), starts
  from the ``bos_token_id``, one row per prompt, as stock ``generate`` does without input ids.
* A token id outside the model's vocabulary (negative, or >= ``vocab_size``) is a
  ``ValueError`` naming it, not an ``IndexError`` from inside the embedding lookup.
"""

from __future__ import annotations

import torch


def check_token_ids(input_ids: torch.Tensor, vocab_size: int | None) -> None:
    """Raise ``ValueError`` for an empty batch or an id the model has no embedding for."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}: give a (batch, length) tensor with "
            "at least one sequence."
        )
    if input_ids.numel() == 0 or vocab_size is None:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds token id {bad}, outside the model's vocabulary of {vocab_size} "
            "(ids 0 to vocab_size - 1): was it encoded with another model's tokenizer?"
        )


def prompt_ids(
    input_ids: torch.Tensor | None, bos_token_id: int | None, vocab_size: int | None
) -> torch.Tensor:
    """The prompt ``generate`` runs: ``input_ids`` checked, or a ``bos_token_id`` column for
    a missing or zero-length prompt."""
    if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[0] == 0:
        check_token_ids(input_ids, vocab_size)  # raises: an empty batch
    if input_ids is None or (input_ids.dim() == 2 and input_ids.shape[1] == 0):
        if bos_token_id is None:
            raise ValueError(
                "The prompt is empty and the model has no bos_token_id to start from: give at "
                "least one token."
            )
        rows = 1 if input_ids is None else input_ids.shape[0]
        device = None if input_ids is None else input_ids.device
        input_ids = torch.full((rows, 1), bos_token_id, dtype=torch.long, device=device)
    check_token_ids(input_ids, vocab_size)
    return input_ids
