"""Packing rows whose scores are mostly -inf, so that warpers work on a few columns.

After top-k (or a short allowed list) only a few tokens per row are still
possible. Temperature, top-k, top-p, min-p and typical-p only look at the
values of a row, not at which token holds them, so they can run on the
possible tokens packed into a narrow `[n, K]` tensor and the result be
scattered back: a top-p ranking of 50 columns instead of 49,152.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rows import NEG_INF, position_in_row

MAX_FRACTION = 8  # pack only when at most 1/8 of the columns are still possible


@dataclass(slots=True)
class PackedScores:
    """The possible scores of `[n, V]` rows packed into `values` `[n, K]` (-inf elsewhere).

    Entry `f` of the index tensors `[F]` says that `values[rows[f], slots[f]]`
    is the score of token `tokens[f]` of row `rows[f]`.
    """

    values: torch.Tensor  # [n, K]
    rows: torch.Tensor  # [F]
    slots: torch.Tensor  # [F]
    tokens: torch.Tensor  # [F]
    source: torch.Tensor  # [n, V] the packed scores, reused (overwritten) by `unpack`

    @classmethod
    def pack(cls, scores: torch.Tensor) -> PackedScores | None:
        """Pack the finite scores of `scores` `[n, V]`, or None when too many are finite."""
        n, vocab = scores.shape
        finite = scores > NEG_INF  # [n, V]
        counts = finite.sum(1, dtype=torch.int32)  # [n] (an int32 sum of bools is much faster)
        width = int(counts.max()) if n else 0
        if width * MAX_FRACTION > vocab:
            return None
        rows, tokens = finite.nonzero(as_tuple=True)  # [F] row-major
        slots = position_in_row(rows, counts)  # [F]
        values = torch.full((n, max(width, 1)), NEG_INF, dtype=scores.dtype, device=scores.device)
        values[rows, slots] = scores[rows, tokens]
        return cls(values, rows, slots, tokens, scores)

    @classmethod
    def top_k(cls, scores: torch.Tensor, ks: Sequence[int]) -> PackedScores | None:
        """Top-k of every row of `scores` `[n, V]` (as `TopKLogitsWarper`), packed.

        None when the widest k is too wide to gain anything, or when a row
        has more ties with its k-th score than fit (then top-k runs unpacked).
        """
        n, vocab = scores.shape
        widest = max(ks)
        if (widest + 1) * MAX_FRACTION > vocab:
            return None
        # one more than needed: whether the next score ties with a row's k-th
        top = torch.topk(scores, widest + 1, dim=1)  # [n, kmax+1] descending
        kth_pos = torch.tensor(ks, dtype=torch.long, device=scores.device).unsqueeze(1) - 1
        kth = top.values.gather(1, kth_pos)  # [n, 1]
        # transformers keeps every score >= the k-th: all of them must be among the kmax
        if bool(((top.values[:, widest:] >= kth) & kth.isfinite()).any()):
            return None
        values = top.values[:, :widest]  # [n, kmax]
        values = values.masked_fill(values < kth, NEG_INF)
        rows = torch.arange(n, device=scores.device).repeat_interleave(widest)  # [n*kmax]
        slots = torch.arange(widest, device=scores.device).repeat(n)  # [n*kmax]
        return cls(values, rows, slots, top.indices[:, :widest].flatten(), scores)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter `values` `[n, K]` (warped `self.values`) back to full `[n, V]` rows.

        Writes into `source` (refilling memory in place is several times
        cheaper than a new tensor on CPU) and returns it.
        """
        out = self.source.fill_(NEG_INF)  # [n, V]
        out[self.rows, self.tokens] = values[self.rows, self.slots].to(out.dtype)
        return out
