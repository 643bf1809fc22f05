"""Helpers for applying a stage to some rows of a batch of scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def apply_to_rows(
    scores: torch.Tensor, idx: Sequence[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Replace rows `idx` (ascending, unique) of `scores` `[N, V]` by `fn` of them.

    When `idx` covers every row, `fn` sees `scores` itself (no copy) and its
    result is returned; otherwise the rows are gathered, transformed and
    written back in place.
    """
    if len(idx) == scores.shape[0]:
        return fn(scores)
    index = torch.tensor(idx, dtype=torch.long, device=scores.device)  # [n]
    scores.index_copy_(0, index, fn(scores.index_select(0, index)))
    return scores


def column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as a `[n, 1]` tensor with the dtype and device of `like`."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # [n, 1]
