"""Helpers for applying a stage to some rows of a batch of scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")  # the score of a token ruled out


def row_index(idx: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row numbers `idx` as a `[n]` long tensor on `device`."""
    return torch.tensor(idx, dtype=torch.long, device=device)


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
    index = row_index(idx, scores.device)  # [n]
    scores.index_copy_(0, index, fn(scores.index_select(0, index)))
    return scores


def column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as a `[n, 1]` tensor with the dtype and device of `like`."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # [n, 1]


def position_in_row(row: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Index of each flat token `[T]` in its row, given the row lengths `[n]`
    (the flat tokens are row-major: `row` is sorted)."""
    starts = torch.cumsum(lens, 0) - lens  # [n] offset of each row in the flat tensors
    return torch.arange(row.numel(), device=row.device) - starts[row]  # [T]
