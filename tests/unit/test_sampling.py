"""The sampler: greedy choice, seeded reproducibility, the sampled distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import decode_row
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle.worker.params import LogprobsParams, SamplingParams
from treadle.worker.processors import LogitsPipeline
from treadle.worker.sampling import Sampler, first_argmax

V = 64


make_row = decode_row


def test_greedy_rows_take_the_argmax_and_get_no_logprobs() -> None:
    scores = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    rows = [make_row([1], SamplingParams(), i) for i in range(5)]
    choice = Sampler(seed=0)(scores.clone(), scores, rows)
    assert torch.equal(choice.token_ids, scores.argmax(dim=1))
    assert choice.logprobs == [None] * 5


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.sampled_from([128, 256, 384, 1024, 3072, 1000]),
    values=st.lists(st.sampled_from([0.0, 1.0, 2.0, -math.inf, math.inf, math.nan]), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_first_argmax_is_torch_argmax(
    rows: int, vocab: int, values: list[float], seed: int
) -> None:
    """Ties (the first maximum wins), NaN, infinities, rows that are all -inf and vocabularies
    that no block divides give torch's own argmax."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 3, (rows, vocab), generator=g).float()  # many ties
    where = torch.randint(0, rows * vocab, (len(values),), generator=g)
    scores.view(-1)[where] = torch.tensor(values)
    if seed % 5 == 0:
        scores[0] = -math.inf
    assert torch.equal(first_argmax(scores), scores.argmax(dim=1))


def test_greedy_and_sampled_rows_in_one_batch() -> None:
    scores = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    top3 = scores.topk(3).indices
    rows = [
        make_row([1], SamplingParams(), 0),
        make_row([1], SamplingParams(temperature=1.0, top_k=3), 1),
        make_row([1], SamplingParams(), 2),
        make_row([1], SamplingParams(temperature=1.0, top_k=3, seed=5), 3),
    ]
    for step in range(20):
        processed = LogitsPipeline(V)(scores.clone(), rows).scores
        choice = Sampler(seed=step)(scores, processed, rows)
        assert (
            choice.token_ids[0] == scores[0].argmax() and choice.token_ids[2] == scores[2].argmax()
        )
        assert choice.token_ids[1] in top3[1] and choice.token_ids[3] in top3[3]


def _row_logits(step: int) -> torch.Tensor:
    """The seeded row's logits at `step`: the same whatever shares the batch."""
    return torch.randn(V, generator=torch.Generator().manual_seed(1000 + step)) * 2


def _generate(seed: int, others: int, steps: int = 12) -> list[int]:
    """Run pipeline + sampler for `steps` with a seeded row at position 1 of a batch of
    `1 + others` rows (other rows random and reseeded every step)."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    tokens = [3, 4]
    sampler = Sampler(seed=seed + 17 * others)  # a different shared generator per batch
    noise = torch.Generator().manual_seed(99 + others)
    for step in range(steps):
        rows = []
        logits = []
        for j in range(others + 1):
            if j == min(1, others):
                rows.append(make_row(list(tokens), params, j, prompt_len=2))
                logits.append(_row_logits(step))
            else:
                other = SamplingParams(temperature=1.3, seed=j if j % 2 else None, top_k=j * 3)
                rows.append(make_row([5] * (j + 2), other, j))
                logits.append(torch.randn(V, generator=noise) * 3)
        batch = torch.stack(logits)
        processed = LogitsPipeline(V)(batch.clone(), rows).scores
        choice = sampler(batch, processed, rows)
        tokens.append(int(choice.token_ids[min(1, others)]))
    return tokens[2:]


def test_a_seeded_row_gives_the_same_tokens_alone_and_inside_any_batch() -> None:
    alone = _generate(seed=123, others=0)
    assert _generate(seed=123, others=5) == alone
    assert _generate(seed=123, others=9) == alone
    assert len(set(alone)) > 3  # really sampling, not stuck on one token


def test_different_seeds_give_different_tokens() -> None:
    runs = {tuple(_generate(seed=s, others=2)) for s in range(4)}
    assert len(runs) == 4


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    scores = torch.randn(8, V, generator=torch.Generator().manual_seed(2))
    rows = [make_row([1], SamplingParams(temperature=1.0), i) for i in range(8)]
    first = Sampler(seed=7)(scores, scores.clone(), rows).token_ids
    assert torch.equal(Sampler(seed=7)(scores, scores.clone(), rows).token_ids, first)
    assert not torch.equal(Sampler(seed=8)(scores, scores.clone(), rows).token_ids, first)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 0.1% critical value of chi-square with 7 degrees of freedom
CHI2_7_DOF_999 = 24.32


def test_sampled_tokens_follow_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    probs = torch.softmax(logits, dim=0)
    n_rows, steps = 2000, 10
    rows = [make_row([1], SamplingParams(temperature=1.0), i) for i in range(n_rows)]
    sampler = Sampler(seed=0)
    batch = logits.expand(n_rows, -1).contiguous()
    counts = torch.zeros(8)
    for _ in range(steps):
        counts += torch.bincount(sampler(batch, batch, rows).token_ids, minlength=8)
    assert _chi_square(counts, probs) < CHI2_7_DOF_999
    # and a skewed distribution is not mistaken for it
    assert _chi_square(counts, torch.softmax(logits * 1.2, dim=0)) > CHI2_7_DOF_999


def test_seeded_rows_also_follow_the_softmax_across_seeds() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    probs = torch.softmax(logits, dim=0)
    rows = [make_row([1], SamplingParams(temperature=1.0, seed=s), s) for s in range(10000)]
    batch = logits.expand(len(rows), -1).contiguous()
    counts = torch.bincount(Sampler(seed=0)(batch, batch, rows).token_ids, minlength=8).float()
    assert _chi_square(counts, probs) < CHI2_7_DOF_999


def test_sampling_over_a_wide_vocabulary_never_picks_an_impossible_token() -> None:
    vocab = 5000  # not a multiple of the sampler's block size
    g = torch.Generator().manual_seed(4)
    scores = torch.full((64, vocab), -torch.inf)
    allowed = torch.randint(0, vocab, (64, 3), generator=g)
    scores.scatter_(1, allowed, torch.randn(64, 3, generator=g))
    scores[0, vocab - 1] = 5.0  # the last, short block
    rows = [make_row([1], SamplingParams(temperature=1.0), i) for i in range(64)]
    sampler = Sampler(seed=1)
    for _ in range(20):
        chosen = sampler(scores, scores, rows).token_ids
        assert bool(scores.gather(1, chosen.unsqueeze(1)).isfinite().all())


def test_a_row_with_no_possible_token_gets_an_error_whatever_shares_the_batch() -> None:
    raw = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    scores = raw.clone()
    scores[0] = -torch.inf  # sampled, nothing possible
    scores[1, 5] = torch.nan  # greedy, broken scores
    scores[2] = -torch.inf  # greedy, nothing possible
    rows = [
        make_row([1], SamplingParams(temperature=1.0), 0),
        make_row([1], SamplingParams(), 1),
        make_row([1], SamplingParams(), 2),
        make_row([1], SamplingParams(temperature=1.0), 3),
    ]
    for raw_logits in (raw, scores):  # with or without a separate raw copy
        choice = Sampler(seed=0)(raw_logits, scores, rows)
        assert sorted(choice.errors) == [0, 1, 2]
        assert "allowed_token_ids" in choice.errors[0]
        assert bool(scores[3, int(choice.token_ids[3])].isfinite())


def test_logprobs_raw_and_processed_with_top_n_most_likely_first() -> None:
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(3, V, generator=g) * 2
    allowed = (3, 10, 20)
    rows = [
        make_row(
            [1], SamplingParams(allowed_token_ids=allowed, logprobs=LogprobsParams(top_n=5)), 0
        ),
        make_row(
            [1],
            SamplingParams(
                allowed_token_ids=allowed, logprobs=LogprobsParams(top_n=5, processed=True)
            ),
            1,
        ),
        make_row([1], SamplingParams(allowed_token_ids=allowed), 2),  # did not ask
    ]
    processed = LogitsPipeline(V)(raw.clone(), rows).scores
    choice = Sampler(seed=0)(raw, processed, rows)
    assert choice.logprobs[2] is None

    raw_lp = torch.log_softmax(raw[0], dim=0)
    lp = choice.logprobs[0]
    assert lp is not None and lp.token_id == int(choice.token_ids[0]) and lp.token_id in allowed
    assert lp.logprob == pytest.approx(float(raw_lp[lp.token_id]), abs=1e-6)
    assert [t for t, _ in lp.top] == raw_lp.topk(5).indices.tolist()
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(raw_lp.topk(5).values.tolist(), abs=1e-6)

    proc_lp = torch.log_softmax(processed[1], dim=0)
    lp = choice.logprobs[1]
    assert lp is not None and lp.token_id in allowed
    assert lp.logprob == pytest.approx(float(proc_lp[lp.token_id]), abs=1e-6)
    assert math.isclose(sum(math.exp(v) for _, v in lp.top[:3]), 1.0, rel_tol=1e-5)
    assert {t for t, _ in lp.top[:3]} == set(allowed)
    assert [v for _, v in lp.top[3:]] == [float("-inf")] * 2  # banned tokens: -inf, not NaN


def test_logprobs_of_sampled_rows_and_top_zero() -> None:
    scores = torch.randn(2, V, generator=torch.Generator().manual_seed(6))
    rows = [
        make_row([1], SamplingParams(temperature=1.0, logprobs=LogprobsParams()), 0),
        make_row([1], SamplingParams(logprobs=LogprobsParams(top_n=1)), 1),
    ]
    choice = Sampler(seed=0)(scores, scores, rows)
    first, second = choice.logprobs
    assert first is not None and first.top == ()
    assert first.logprob == pytest.approx(float(torch.log_softmax(scores[0], 0)[first.token_id]))
    assert second is not None and second.top[0][0] == second.token_id == int(scores[1].argmax())
