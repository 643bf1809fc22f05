"""A step's rows as the stages see them, with their histories' statistics flattened."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..plan import RowInput


class StepBatch:
    """The rows of a step: `rows[i]` is row i of the scores.

    `seen(idx)` and `generated_counts(idx)` flatten, for rows `idx`, what each
    row's `TokenHistory` keeps incrementally into parallel `[T]` tensors whose
    first is the local row (`0..len(idx)-1`). Their size is each row's number of
    distinct tokens (bounded by the vocabulary), never its history's length.
    """

    def __init__(self, rows: Sequence[RowInput], device: torch.device) -> None:
        self.rows = rows
        self._device = device

    def seen(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row `[T]`, token id `[T]`): every distinct token of prompt + generated."""
        row, (tokens,) = self._flatten([(self.rows[i].history.seen_ids(),) for i in idx])
        return row, tokens

    def generated_counts(
        self, idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local row `[T]`, token id `[T]`, count `[T]`): every distinct generated token."""
        row, (tokens, counts) = self._flatten(
            [self.rows[i].history.generated_counts() for i in idx]
        )
        return row, tokens, counts

    def _flatten(
        self, parts: list[tuple[np.ndarray, ...]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each row's parallel arrays (`parts[r]`, equal lengths) concatenated over the rows:
        the local row of every entry `[T]`, and one `[T]` tensor per array."""
        lens = np.fromiter((len(p[0]) for p in parts), dtype=np.int64, count=len(parts))
        row = np.repeat(np.arange(len(parts), dtype=np.int64), lens)  # [T]
        width = len(parts[0]) if parts else 1
        columns = [
            np.concatenate([p[k] for p in parts]) if parts else np.empty(0, dtype=np.int64)
            for k in range(width)
        ]  # each [T]
        return self._tensor(row), [self._tensor(c) for c in columns]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self._device)
