"""Temperature, top-k and min-p, vectorised over the sampling rows.

A warper takes the scores `[n, W]` of the rows it applies to and their
parameters, and returns the warped scores (possibly modified in place). It
only looks at the values of a row, not at which token holds them, so it
also runs on packed scores (see `compact.py`). Each matches its
transformers warper with `min_tokens_to_keep=1`: `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `MinPLogitsWarper`. Top-p and typical-p are in
`truncation.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..params import SamplingParams
from .rows import NEG_INF, column


def apply_temperature(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Divide each row by its temperature."""
    return scores.div_(column([p.temperature for p in params], scores))


def apply_top_k(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Keep the `top_k` highest scores of each row (and ties), with one `topk` for all rows."""
    width = scores.shape[1]
    ks = [min(p.top_k, width) for p in params]
    if min(ks) == width:  # every row keeps everything
        return scores
    kth_pos = torch.tensor(ks, dtype=torch.long, device=scores.device).unsqueeze(1) - 1  # [n, 1]
    top = torch.topk(scores, max(ks), dim=1).values  # [n, kmax] descending
    kth = top.gather(1, kth_pos)  # [n, 1]
    return scores.masked_fill_(scores < kth, NEG_INF)


def apply_min_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop the tokens less likely than `min_p` times the row's most likely one."""
    probs = torch.softmax(scores, dim=1)  # [n, W]
    threshold = column([p.min_p for p in params], scores) * probs.amax(1, keepdim=True)  # [n, 1]
    # the most likely token is never below min_p (<= 1) times itself, so it is always kept
    return scores.masked_fill_(probs < threshold, NEG_INF)
