"""Choosing each row's next token, and the log-probabilities the requests asked for.

Greedy rows (temperature 0) take the argmax of their processed scores.
Sampling rows draw from softmax(scores) by inverting the cumulative
distribution with one uniform number per row: a row with its own seed
draws that number from a generator seeded with (seed, tokens generated so
far), so its tokens do not depend on anything else in the batch; the other
sampling rows share the sampler's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..api.outcome import TokenLogprob
from .plan import RowInput
from .processors.rows import row_index

_MASK64 = (1 << 64) - 1
_BLOCK = 1024  # tokens per block when inverting the cumulative distribution
_ARGMAX_BLOCKS = (1024, 512, 256, 128)  # vocabulary blocks `first_argmax` may split into


@dataclass(slots=True)
class Choice:
    """The chosen tokens of a step."""

    token_ids: torch.Tensor  # [N] long
    logprobs: list[TokenLogprob | None]  # per row; None unless rows[i].params.logprobs is set
    errors: dict[int, str]  # row -> why it has no token (its constraints rule out every one)


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=1)` of `[N, V]` scores (the first maximum of each row, NaN counting
    as the maximum, as torch's): on the CPU in two passes over blocks of the vocabulary.

    torch's CPU argmax over a long last dimension runs about 8x slower than a max (2.6 ms
    against 0.3 ms at 51 x 49,152); the block maxima, the first block holding the row's
    maximum and the argmax inside that block give the same index.
    """
    n, vocab = scores.shape
    block = next((b for b in _ARGMAX_BLOCKS if vocab % b == 0 and vocab > b), None)
    if scores.device.type != "cpu" or block is None or not scores.is_contiguous():
        return scores.argmax(dim=1)
    blocks = scores.view(n, vocab // block, block)  # [N, V / b, b]
    first = blocks.amax(dim=2).argmax(dim=1)  # [N]: the first block holding the maximum
    rows = torch.arange(n, device=scores.device)  # [N]
    return first * block + blocks[rows, first].argmax(dim=1)  # [N]


class Sampler:
    """Picks one token per row from processed scores.

    `seed` seeds the generator shared by sampling rows without a seed of
    their own (None: a random seed). Seeded rows are reproducible whatever
    else is in the batch. Logprobs (only for rows that ask) are the
    log-softmax of the raw logits or, with `processed`, of the scores.
    A row whose scores leave no possible token (all -inf or NaN), greedy or
    sampled, gets an error instead of a token.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed & _MASK64)

    def __call__(
        self, raw_logits: torch.Tensor, scores: torch.Tensor, rows: Sequence[RowInput]
    ) -> Choice:
        """Choose a token for each row; `raw_logits` and `scores` are `[N, V]`."""
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if not sampled:
            token_ids = first_argmax(scores)  # [N] the common case: one argmax
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=scores.device)  # [N]
            greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
            if greedy:
                index = row_index(greedy, scores.device)
                token_ids[index] = first_argmax(scores.index_select(0, index))
            index = row_index(sampled, scores.device)
            token_ids[index] = self._sample(scores, rows, sampled)
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if any(r.params.logprobs is not None for r in rows):
            logprobs = token_logprobs(raw_logits, scores, token_ids, rows)
        return Choice(token_ids, logprobs, _impossible(scores, token_ids))

    def _sample(
        self, scores: torch.Tensor, rows: Sequence[RowInput], idx: list[int]
    ) -> torch.Tensor:
        """Draw a token for each row `idx` from softmax(scores) -> `[n]`."""
        index = row_index(idx, scores.device)  # [n]
        sub = scores if len(idx) == scores.shape[0] else scores.index_select(0, index)
        probs = torch.softmax(sub.float(), dim=1)  # [n, V]
        u = self._uniforms([rows[i] for i in idx]).to(scores.device)  # [n, 1] float64
        return _invert_cdf(probs, u)  # a row without mass is caught by _impossible

    def _uniforms(self, rows: Sequence[RowInput]) -> torch.Tensor:
        """One uniform number in [0, 1) per row `[n, 1]`: its own for seeded rows,
        one draw of the shared generator for the others."""
        u = torch.empty(len(rows), 1, dtype=torch.float64)  # [n, 1]
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(
                len(unseeded), 1, generator=self.generator, dtype=torch.float64
            )
        for j, r in enumerate(rows):
            seed = r.params.seed
            if seed is not None:
                generator = torch.Generator().manual_seed(_step_seed(seed, r.num_generated))
                u[j] = torch.rand(1, generator=generator, dtype=torch.float64)
        return u


def token_logprobs(
    raw_logits: torch.Tensor,
    scores: torch.Tensor,
    token_ids: torch.Tensor,
    rows: Sequence[RowInput],
) -> list[TokenLogprob | None]:
    """Logprobs of the chosen `token_ids` `[N]` and the `top_n` most likely tokens,
    for the rows that asked; from `raw_logits` or, with `processed`, `scores` `[N, V]`."""
    out: list[TokenLogprob | None] = [None] * len(rows)
    for processed in (False, True):
        idx = [
            i
            for i, r in enumerate(rows)
            if r.params.logprobs is not None and r.params.logprobs.processed == processed
        ]
        if not idx:
            continue
        source = scores if processed else raw_logits
        index = row_index(idx, source.device)  # [n]
        logp = torch.log_softmax(source.index_select(0, index).float(), dim=1)  # [n, V]
        chosen_ids = token_ids.index_select(0, index)  # [n]
        chosen = logp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()  # [n]
        chosen_list = chosen_ids.tolist()
        top_ns = [min(rows[i].params.logprobs.top_n, logp.shape[1]) for i in idx]  # type: ignore[union-attr]
        top_values: list[list[float]] = [[] for _ in idx]
        top_ids: list[list[int]] = [[] for _ in idx]
        if max(top_ns) > 0:
            top = torch.topk(logp, max(top_ns), dim=1)  # [n, k] most likely first
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, i in enumerate(idx):
            k = top_ns[j]
            out[i] = TokenLogprob(
                token_id=chosen_list[j],
                logprob=chosen[j],
                top=tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True)),
            )
    return out


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative `probs` `[n, V]` first exceeds `u * total`.

    Two levels instead of a cumulative sum over the whole row: sums of
    blocks of `_BLOCK` tokens pick the block, then one block is summed
    token by token. Only tokens with a positive probability can be picked.
    Returns the tokens `[n]`; a row without mass gets an arbitrary valid id.
    """
    n, vocab = probs.shape
    full = vocab // _BLOCK * _BLOCK
    block_mass = [probs[:, :full].reshape(n, -1, _BLOCK).sum(2)]  # [n, B]
    if full < vocab:
        block_mass.append(probs[:, full:].sum(1, keepdim=True))  # [n, 1] the short last block
    block_cdf = torch.cat(block_mass, dim=1).cumsum(1, dtype=torch.float64)  # [n, B']
    total = block_cdf[:, -1:]  # [n, 1]
    target = torch.minimum(u * total, _below(total))  # [n, 1] strictly below the total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # [n, 1]
    cols = block * _BLOCK + torch.arange(_BLOCK, device=probs.device)  # [n, BLOCK]
    in_vocab = cols < vocab
    p = probs.gather(1, cols.clamp(max=vocab - 1)) * in_vocab  # [n, BLOCK]
    cdf = p.cumsum(1, dtype=torch.float64)  # [n, BLOCK]
    within = torch.minimum(target - before, _below(cdf[:, -1:]))  # [n, 1]
    pos = torch.searchsorted(cdf, within, right=True).clamp_(max=_BLOCK - 1)  # [n, 1]
    return cols.gather(1, pos).squeeze(1).clamp_(max=vocab - 1)


NO_POSSIBLE_TOKEN = (
    "no possible next token: the request's constraints (allowed_token_ids, bad_words_ids, "
    "logit_bias, min_new_tokens, plugins) rule out every token"
)


def _impossible(scores: torch.Tensor, token_ids: torch.Tensor) -> dict[int, str]:
    """The rows whose chosen token has no finite score `scores` `[N, V]`: nothing was possible."""
    best = scores.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    bad = ~(best > -torch.inf)  # [N] -inf or NaN
    if not bool(bad.any()):
        return {}
    return dict.fromkeys(bad.nonzero().flatten().tolist(), NO_POSSIBLE_TOKEN)


def _below(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.zeros_like(x))


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit seed mixing a request's seed and its step (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1
