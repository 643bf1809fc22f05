"""What a prompt chunk costs of a step's token budget.

A step's time grows with its tokens, and a prompt token also attends to every
position before it: past some context length its attention costs more than
the rest of its forward. With an `attention_span` A (the context at which one
token's attention costs as much as its other work, `worker/step_cost.py`), a
chunk of n tokens from position s costs

    n + n * (s + (n - 1) / 2) / A

budget tokens, so a step holds fewer tokens of a long prompt's end than of
its beginning and every step of a long prefill takes about the same time
(W3: the decoding streams' gaps stay even while the prompt's last chunks
attend to 1,900 positions). Decode tokens count one each. A = None: every
token counts one.
"""

from __future__ import annotations

import math


def chunk_cost(start: int, n: int, span: int | None) -> float:
    """Budget tokens of `n` prompt tokens at positions start..start+n-1."""
    if span is None or n <= 0:
        return float(n)
    return n + n * (start + (n - 1) / 2) / span


def chunk_fit(start: int, budget: float, span: int | None) -> int:
    """The most tokens from position `start` whose `chunk_cost` is within `budget` (0 if none)."""
    if budget < 1:
        return 0
    if span is None:
        return int(budget)
    # cost <= budget is a n^2 + b n - budget <= 0 with a = 1 / 2A, b = 1 + (start - 1/2) / A
    a = 1 / (2 * span)
    b = 1 + (start - 0.5) / span
    n = int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a))
    while n > 0 and chunk_cost(start, n, span) > budget:  # float rounding at the edges
        n -= 1
    while chunk_cost(start, n + 1, span) <= budget:
        n += 1
    return n
