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
        parts = [self.rows[i].history.seen_ids() for i in idx]
        return self._flatten(parts, parts)

    def generated_counts(
        self, idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local row `[T]`, token id `[T]`, count `[T]`): every distinct generated token."""
        pairs = [self.rows[i].history.generated_counts() for i in idx]
        ids = [p[0] for p in pairs]
        row, tokens = self._flatten(ids, ids)
        _, counts = self._flatten(ids, [p[1] for p in pairs])
        return row, tokens, counts

    def _flatten(
        self, shape: list[np.ndarray], values: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lens = np.fromiter((len(a) for a in shape), dtype=np.int64, count=len(shape))
        row = np.repeat(np.arange(len(shape), dtype=np.int64), lens)  # [T]
        flat = np.concatenate(values) if values else np.empty(0, dtype=np.int64)  # [T]
        return torch.from_numpy(row).to(self._device), torch.from_numpy(flat).to(self._device)
