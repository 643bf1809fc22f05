"""logit_bias: add a per-request bias to single tokens.

Like transformers' `SequenceBiasLogitsProcessor` with single-token sequences:
each biased id gets its bias added once (a repeated id keeps its last bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import StepBatch


def apply_logit_bias(scores: torch.Tensor, batch: StepBatch, idx: Sequence[int]) -> torch.Tensor:
    """Add each row's `logit_bias` to `scores` `[N, V]` in place, for rows `idx`."""
    vocab = scores.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i in idx:
        for token, bias in dict(batch.rows[i].params.logit_bias).items():
            if 0 <= token < vocab:  # the frontend validates ids; out of range ones are ignored
                row_ids.append(i)
                token_ids.append(token)
                biases.append(bias)
    if row_ids:
        at = (
            torch.tensor(row_ids, dtype=torch.long, device=scores.device),  # [K]
            torch.tensor(token_ids, dtype=torch.long, device=scores.device),  # [K]
        )
        values = torch.tensor(biases, dtype=scores.dtype, device=scores.device)  # [K]
        scores.index_put_(at, values, accumulate=True)
    return scores
