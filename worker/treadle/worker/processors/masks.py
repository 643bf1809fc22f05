"""Hard token masks: bad words, min new tokens and allowed tokens.

- bad_words_ids (like `NoBadWordsLogitsProcessor`): a single-token sequence
  is always banned; a longer one bans its last token when the rest of it is
  the tail of the row's tokens. Unlike transformers, EOS sequences are not
  filtered out here (the frontend decides what is banned).
- min_new_tokens (like `MinNewTokensLengthLogitsProcessor`): the row's
  `min_tokens_suppressed` ids are banned while it has generated fewer than
  `min_new_tokens` tokens.
- allowed_token_ids (like `PrefixConstrainedLogitsProcessor` with a fixed
  list): every other token is banned; when every allowed token is already
  banned, the allowed ones are forced back to 0 so the constraint holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

from ..plan import RowInput
from .batch import StepBatch
from .rows import NEG_INF, row_index


def min_new_tokens_active(row: RowInput) -> bool:
    p = row.params
    return bool(p.min_tokens_suppressed) and row.num_generated < p.min_new_tokens


def apply_bad_words(scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]) -> torch.Tensor:
    """Ban each row's bad words in `scores` `[N, V]` in place, for rows `idx`."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i in idx:
        token_ids_so_far = batch.rows[i].token_ids
        for seq in batch.rows[i].params.bad_words_ids:
            prefix_len = len(seq) - 1
            if prefix_len == 0 or (
                prefix_len <= len(token_ids_so_far)
                and tuple(token_ids_so_far[-prefix_len:]) == tuple(seq[:-1])
            ):
                row_ids.append(i)
                token_ids.append(seq[-1])
    return _fill(scores, row_ids, token_ids)


def apply_min_new_tokens(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Ban `min_tokens_suppressed` in `scores` `[N, V]` in place, for rows `idx` (all active)."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i in idx:
        suppressed = batch.rows[i].params.min_tokens_suppressed
        row_ids.extend([i] * len(suppressed))
        token_ids.extend(suppressed)
    return _fill(scores, row_ids, token_ids)


def apply_allowed_tokens(
    scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]
) -> torch.Tensor:
    """Keep only each row's `allowed_token_ids` in `scores` `[N, V]`, for rows `idx`."""
    vocab = scores.shape[1]
    lists = [batch.rows[i].params.allowed_token_ids for i in idx]
    lens = [len(ids) for ids in lists]
    # numpy reads Python ints several times faster than torch.tensor(list)
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=sum(lens))
    tokens = torch.from_numpy(flat).to(scores.device)  # [A]
    rows = torch.from_numpy(np.repeat(np.asarray(idx, dtype=np.int64), lens)).to(scores.device)
    keep = (tokens >= 0) & (tokens < vocab)  # the frontend validates ids
    rows, tokens = rows[keep], tokens[keep]  # [A]
    allowed = scores[rows, tokens]  # [A]
    # every allowed token already banned: force them back to 0 so the constraint holds
    best = torch.full((scores.shape[0],), NEG_INF, dtype=scores.dtype, device=scores.device)
    best.scatter_reduce_(0, rows, allowed, reduce="amax")  # [N]
    allowed = torch.where(best[rows].isneginf(), 0.0, allowed)  # [A]
    if len(idx) == scores.shape[0]:
        scores.fill_(NEG_INF)  # much cheaper than index_fill_ or a new tensor
    else:
        scores.index_fill_(0, row_index(idx, scores.device), NEG_INF)
    scores[rows, tokens] = allowed
    return scores


def _fill(scores: torch.Tensor, row_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    vocab = scores.shape[1]
    keep = [k for k, t in enumerate(token_ids) if 0 <= t < vocab]  # frontend validates ids
    if keep:
        at = (
            torch.tensor([row_ids[k] for k in keep], dtype=torch.long, device=scores.device),
            torch.tensor([token_ids[k] for k in keep], dtype=torch.long, device=scores.device),
        )
        scores.index_put_(at, torch.tensor(NEG_INF, dtype=scores.dtype, device=scores.device))
    return scores
