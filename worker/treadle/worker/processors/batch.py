"""A step's rows as the stages see them, with token histories built on demand."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

from ..plan import RowInput
from .rows import position_in_row


class StepBatch:
    """The rows of a step and their token ids, flattened once per (rows, part) for the stages.

    `rows[i]` is row i of the scores.
    `flat(idx)` gives every token of rows `idx` as parallel `[T]` tensors
    (local row in `0..len(idx)-1`, token id); `generated_only=True` keeps the
    generated tokens only. `left_padded(idx)` gives `[len(idx), L]` with each
    row right-aligned and `-1` on the left.
    """

    def __init__(self, rows: Sequence[RowInput], device: torch.device) -> None:
        self.rows = rows
        self._device = device
        self._flat: dict[tuple[tuple[int, ...], bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def flat(
        self, idx: Sequence[int], generated_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(idx), generated_only)
        if key not in self._flat:
            whole = self._flat.get((key[0], False))
            if generated_only and whole is not None:  # cheaper than reading the ids again
                self._flat[key] = self._generated_part(idx, *whole)
            else:
                self._flat[key] = self._build(idx, generated_only)
        return self._flat[key]

    def lengths(self, idx: Sequence[int]) -> torch.Tensor:
        return torch.tensor(
            [len(self.rows[i].token_ids) for i in idx], dtype=torch.long, device=self._device
        )  # [n]

    def left_padded(self, idx: Sequence[int]) -> torch.Tensor:
        row, ids = self.flat(idx)
        lens = self.lengths(idx)  # [n]
        width = int(lens.max()) if len(idx) else 0
        col = width - lens[row] + position_in_row(row, lens)  # [T]
        out = torch.full((len(idx), width), -1, dtype=torch.long, device=self._device)  # [n, L]
        out[row, col] = ids
        return out

    def _generated_part(
        self, idx: Sequence[int], row: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = torch.tensor(
            [self.rows[i].prompt_len for i in idx], dtype=torch.long, device=self._device
        )  # [n]
        generated = position_in_row(row, self.lengths(idx)) >= prompt[row]  # [T]
        return row[generated], ids[generated]

    def _build(self, idx: Sequence[int], generated_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[i] for i in idx]
        seqs = [r.token_ids[r.prompt_len :] if generated_only else r.token_ids for r in rows]
        lens = [len(s) for s in seqs]
        total = sum(lens)
        # numpy reads a Python iterable into int64 several times faster than torch.tensor(list)
        ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
        tokens = torch.from_numpy(ids).to(self._device)  # [T]
        row = torch.repeat_interleave(
            torch.arange(len(rows), device=self._device),
            torch.tensor(lens, dtype=torch.long, device=self._device),
        )  # [T]
        return row, tokens
