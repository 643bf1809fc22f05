"""Top-p and typical-p: keep the smallest leading set of a ranking that holds enough mass.

Both rank the tokens (top-p by probability, typical-p by how far each
token's surprise is from the entropy) and keep a prefix of that ranking.
transformers sorts the whole vocabulary for that, which costs ~2.5 ms a row
on a 2-core CPU at V = 49152. Here the ranking is taken with `topk` over a
few candidates, and only the rows whose decision is not settled inside the
candidates are ranked again with four times as many (up to the whole row).
After top-k the candidates are just the surviving tokens, so the common
configurations need a single small `topk`.

Results match `TopPLogitsWarper` and `TypicalLogitsWarper` with
`min_tokens_to_keep=1` up to float rounding of the cumulative sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..params import SamplingParams
from .rows import NEG_INF

FIRST_CANDIDATES = 256  # first ranking width when more tokens than this are still possible
ALL_CANDIDATES_UP_TO = 1024  # rank every possible token at once when there are at most this many


def apply_top_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Keep the most likely tokens of each row holding `top_p` of its mass (`top_p < 1`).

    As `TopPLogitsWarper`: ranked from least likely, a token is dropped when
    it and every less likely token together hold at most `1 - top_p`.
    """
    probs = torch.softmax(scores, dim=1)  # [n, W]
    total = probs.sum(1).double()  # [n]
    positive = (probs > 0).sum(1, dtype=torch.int32)  # [n] tokens that can still be drawn
    drop_mass = torch.tensor(
        [1.0 - p.top_p for p in params], dtype=torch.float64, device=scores.device
    )  # [n]

    def settled(chosen: torch.Tensor, cum: torch.Tensor, _p: torch.Tensor) -> torch.Tensor:
        # the first token past the candidates would be dropped
        return total[chosen] - cum[:, -1] <= drop_mass[chosen]

    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, ids, scores)
    for chosen, ids, cum, p in _ranked_prefixes(scores, probs, positive, settled):
        mass_from_here = total[chosen].unsqueeze(1) - (cum - p)  # [m, K] this and all after
        count = (mass_from_here > drop_mass[chosen].unsqueeze(1)).sum(1).clamp_(min=1)  # [m]
        in_prefix = torch.arange(ids.shape[1], device=scores.device) < count.unsqueeze(1)
        rows = chosen.unsqueeze(1).expand_as(ids)  # [m, K]
        kept.append((rows, ids, scores[rows, ids].masked_fill_(~in_prefix, NEG_INF)))
    scores.fill_(NEG_INF)  # every row is settled: write back only what is kept
    for rows, ids, values in kept:
        scores[rows, ids] = values
    return scores


def apply_typical_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Typical sampling of each row (`typical_p < 1`), as `TypicalLogitsWarper`.

    Tokens ranked by `|-log p - entropy|`; the ranking is cut at the first
    token where the running mass reaches `typical_p`, and every token ranked
    strictly further than it is dropped.
    """
    logp = torch.log_softmax(scores, dim=1)  # [n, W]
    probs = logp.exp()  # [n, W]
    entropy = -(logp * probs).nansum(1, keepdim=True)  # [n, 1]
    distance = (-logp - entropy).abs()  # [n, W] smaller = more typical
    mass = torch.tensor([p.typical_p for p in params], dtype=torch.float64, device=scores.device)
    positive = (probs > 0).sum(1, dtype=torch.int32)  # [n] tokens that can still be drawn

    def settled(chosen: torch.Tensor, cum: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # the mass is reached, or every token that has any is already ranked
        return (cum[:, -1] >= mass[chosen]) | ((p > 0).sum(1) == positive[chosen])

    limit = torch.full((len(params), 1), torch.inf, dtype=scores.dtype, device=scores.device)
    for chosen, ids, cum, _p in _ranked_prefixes(-distance, probs, positive, settled):
        last = (cum < mass[chosen].unsqueeze(1)).sum(1, keepdim=True)  # [m, 1]
        reached = last < ids.shape[1]  # [m, 1]; else nothing is dropped
        ranked_distance = distance[chosen].gather(1, ids)  # [m, K] ascending
        at_last = ranked_distance.gather(1, last.clamp(max=ids.shape[1] - 1))  # [m, 1]
        limit[chosen] = torch.where(reached, at_last, torch.inf)
    return scores.masked_fill_(distance > limit, NEG_INF)


Settled = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ranked_prefixes(
    order: torch.Tensor, probs: torch.Tensor, positive: torch.Tensor, settled: Settled
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank each row of `order` `[n, V]` (highest first) only as far as needed.

    `positive` `[n]` counts each row's tokens with a probability above 0.
    Yields `(chosen [m], ids [m, K], cum [m, K], p [m, K])` for groups of rows
    whose decision `settled(chosen, cum, p)` says is inside their first K
    ranked tokens: `ids` the ranked token ids, `p` their probabilities,
    `cum` (float64) the running sum of `p`. K grows fourfold for the rows
    left, up to the whole row, where every row is settled.
    """
    n, vocab = order.shape
    possible = int(positive.max()) if n else 0
    width = max(possible, 1) if possible <= ALL_CANDIDATES_UP_TO else FIRST_CANDIDATES
    pending = torch.arange(n, device=order.device)  # [m] rows not yet settled
    while pending.numel() > 0:
        width = min(width, vocab)
        every = pending.numel() == n
        ids = torch.topk(order if every else order[pending], width, dim=1).indices  # [m, K]
        p = (probs if every else probs[pending]).gather(1, ids)  # [m, K]
        cum = p.cumsum(1, dtype=torch.float64)  # [m, K]
        done = settled(pending, cum, p) | (width == vocab)  # [m]
        if bool(done.any()):
            yield pending[done], ids[done], cum[done], p[done]
        pending = pending[~done]
        width *= 4
