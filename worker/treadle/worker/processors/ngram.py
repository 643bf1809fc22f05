"""no_repeat_ngram_size: ban the tokens that would repeat an n-gram already seen.

Like `NoRepeatNGramLogitsProcessor` over prompt and generated tokens: the
last `n - 1` tokens of a row are looked up in its history's table of every
(n-1)-gram seen so far and the tokens that followed it (`TokenHistory`,
kept incrementally), and those tokens are banned. A step costs what the bans
number, not what the history holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

from .batch import StepBatch
from .rows import NEG_INF


def apply_no_repeat_ngram(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Ban, in place, repeated n-gram completions for rows `idx` of `scores` `[N, V]`."""
    bans = [
        batch.rows[i].history.ngram_bans(batch.rows[i].params.no_repeat_ngram_size) for i in idx
    ]
    lens = [len(b) for b in bans]
    total = sum(lens)
    if not total:
        return scores
    tokens = np.fromiter(chain.from_iterable(bans), dtype=np.int64, count=total)  # [B]
    rows = np.repeat(np.asarray(idx, dtype=np.int64), lens)  # [B] rows of `scores`
    keep = tokens < scores.shape[1]  # ids past the score width cannot be generated anyway
    scores[
        torch.from_numpy(rows[keep]).to(scores.device),
        torch.from_numpy(tokens[keep]).to(scores.device),
    ] = NEG_INF
    return scores
