"""Repetition, presence and frequency penalties, vectorised over rows.

- repetition_penalty (like `RepetitionPenaltyLogitsProcessor`): every token
  seen in the prompt or generated so far has its score divided by the
  penalty when positive, multiplied by it when negative, once.
- presence_penalty / frequency_penalty (OpenAI semantics, generated tokens
  only): `score -= presence * (count > 0) + frequency * count`.

Both touch only the (row, distinct token) pairs the rows' `TokenHistory`
keeps, never whole rows and never the whole history.
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
    local, tokens = batch.seen(idx)  # [T], [T]: distinct per row
    local, tokens = _in_vocab(scores.shape[1], local, tokens)
    rows = row_index(idx, scores.device)[local]  # [T] rows of `scores`
    penalty = torch.tensor(
        [batch.rows[i].params.repetition_penalty for i in idx],
        dtype=scores.dtype,
        device=scores.device,
    )[local]  # [T]
    seen = scores[rows, tokens]  # [T]
    scores[rows, tokens] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def apply_presence_frequency(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Subtract, in place, the presence and frequency penalties of rows `idx` of `scores`."""
    vocab = scores.shape[1]
    rows, tokens, counts = _in_vocab(vocab, *batch.generated_counts(idx))  # [U] each
    presence = torch.tensor(
        [batch.rows[i].params.presence_penalty for i in idx], device=rows.device
    )
    frequency = torch.tensor(
        [batch.rows[i].params.frequency_penalty for i in idx], device=rows.device
    )
    penalty = presence[rows] + frequency[rows] * counts  # [U] float32 (counts are exact)
    at = (row_index(idx, scores.device)[rows], tokens)
    scores.index_put_(at, -penalty.to(scores.device, scores.dtype), accumulate=True)
    return scores


def _in_vocab(
    vocab: int, rows: torch.Tensor, tokens: torch.Tensor, *more: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Drop the entries whose id is past the score width (such ids cannot be generated,
    as in transformers); `rows`, `tokens` and `more` are parallel `[T]` tensors."""
    if tokens.numel() and int(tokens.max()) >= vocab:
        keep = tokens < vocab
        return tuple(t[keep] for t in (rows, tokens, *more))
    return (rows, tokens, *more)
