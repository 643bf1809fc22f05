"""Repetition, presence and frequency penalties, vectorised over rows.

- repetition_penalty (like `RepetitionPenaltyLogitsProcessor`): every token
  seen in the prompt or generated so far has its score divided by the
  penalty when positive, multiplied by it when negative, once.
- presence_penalty / frequency_penalty (OpenAI semantics, generated tokens
  only): `score -= presence * (count > 0) + frequency * count`.

Both touch only the (row, token) pairs of the histories, never whole rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import StepBatch
from .rows import row_index


def apply_repetition_penalty(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Penalise, in place, the seen tokens of rows `idx` of `scores` `[N, V]`."""
    local, tokens = _in_vocab(*batch.flat(idx), scores.shape[1])  # [T], [T]
    rows = row_index(idx, scores.device)[local]  # [T] rows of `scores`
    penalty = torch.tensor(
        [batch.rows[i].params.repetition_penalty for i in idx],
        dtype=scores.dtype,
        device=scores.device,
    )[local]  # [T]
    seen = scores[rows, tokens]  # [T] read before any write: repeats get the same value
    scores[rows, tokens] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def apply_presence_frequency(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Subtract, in place, the presence and frequency penalties of rows `idx` of `scores`."""
    vocab = scores.shape[1]
    rows, tokens = _in_vocab(*batch.flat(idx, generated_only=True), vocab)  # [T], [T]
    pairs, counts = torch.unique(rows * vocab + tokens, return_counts=True)  # [U], [U]
    rows, tokens = pairs // vocab, pairs % vocab  # [U] local rows, token ids
    presence = torch.tensor(
        [batch.rows[i].params.presence_penalty for i in idx], device=rows.device
    )
    frequency = torch.tensor(
        [batch.rows[i].params.frequency_penalty for i in idx], device=rows.device
    )
    penalty = presence[rows] + frequency[rows] * counts  # [U] float32: counts stay exact
    at = (row_index(idx, scores.device)[rows], tokens)
    scores.index_put_(at, -penalty.to(scores.device, scores.dtype), accumulate=True)
    return scores


def _in_vocab(
    rows: torch.Tensor, tokens: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop ids past the score width (they cannot be generated, as in transformers)."""
    if tokens.numel() and int(tokens.max()) >= vocab:
        keep = tokens < vocab
        return rows[keep], tokens[keep]
    return rows, tokens
