"""no_repeat_ngram_size: ban the tokens that would repeat an n-gram already seen.

Like `NoRepeatNGramLogitsProcessor` over prompt and generated tokens: the
last `n - 1` tokens of a row are matched against every complete window of
`n` tokens in its history, and each matching window bans its last token.
Rows are grouped by `n`; each group is one batched match over histories
right-aligned in a `[rows, L]` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import StepBatch
from .rows import NEG_INF, row_index


def apply_no_repeat_ngram(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Ban, in place, repeated n-gram completions for rows `idx` of `scores` `[N, V]`."""
    by_size: dict[int, list[int]] = {}
    for i in idx:
        by_size.setdefault(batch.rows[i].params.no_repeat_ngram_size, []).append(i)
    for size, group in sorted(by_size.items()):
        local, tokens = banned_tokens(batch.left_padded(group), batch.lengths(group), size)
        keep = tokens < scores.shape[1]  # ids past the score width cannot be generated anyway
        rows = row_index(group, scores.device)[local[keep]]
        scores[rows, tokens[keep]] = NEG_INF
    return scores


def banned_tokens(
    hist: torch.Tensor, lens: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token) pairs `[B]`, `[B]` that would complete a seen `size`-gram.

    `hist` `[n, L]` holds each row right-aligned, `-1` on the left; `lens` `[n]`.
    """
    width = hist.shape[1]
    if width < size:
        empty = torch.empty(0, dtype=torch.long, device=hist.device)
        return empty, empty
    prefix = hist[:, width - size + 1 :]  # [n, size-1] the last size-1 tokens
    windows = hist.unfold(1, size, 1)  # [n, W, size], W = L - size + 1
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # [n, W]
    start = torch.arange(windows.shape[1], device=hist.device)  # [W]
    inside = start.unsqueeze(0) >= (width - lens).unsqueeze(1)  # [n, W] no padding in the window
    matches &= inside & (lens >= size).unsqueeze(1)
    rows, at = matches.nonzero(as_tuple=True)  # [B], [B]
    return rows, windows[rows, at, -1]
