"""TokenHistory: statistics kept incrementally equal the same statistics read from scratch."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from helpers import decode_row

from treadle.worker.history import TokenHistory
from treadle.worker.params import SamplingParams
from treadle.worker.processors import LogitsPipeline


def ngram_bans(ids: list[int], n: int) -> set[int]:
    """Brute force: the last token of every window whose first n-1 tokens end `ids`."""
    if len(ids) < n - 1:
        return set()
    tail = ids[len(ids) - n + 1 :]
    return {ids[e] for e in range(n - 1, len(ids)) if ids[e - n + 1 : e] == tail}


@pytest.mark.parametrize("seed", range(6))
def test_statistics_read_between_appends_equal_a_fresh_history(seed: int) -> None:
    rng = random.Random(seed)
    prompt = [rng.randrange(9) for _ in range(rng.randint(1, 20))]
    history = TokenHistory(prompt)
    for _ in range(60):
        history.append(rng.randrange(9))
        if rng.random() < 0.4:  # read some steps only: catching up over several tokens
            continue
        ids = history.ids
        assert set(history.seen_ids().tolist()) == set(ids)
        assert len(history.seen_ids()) == len(set(ids))
        gen_ids, counts = history.generated_counts()
        assert dict(zip(gen_ids.tolist(), counts.tolist(), strict=True)) == Counter(
            ids[len(prompt) :]
        )
        for n in (1, 2, 3, 4):
            assert set(history.ngram_bans(n)) == ngram_bans(ids, n)


def test_a_fork_is_independent_of_its_origin() -> None:
    history = TokenHistory([1, 2, 3], prompt_len=2)
    history.generated_counts()
    history.ngram_bans(2)
    twin = history.fork()
    twin.append(3)
    history.append(4)
    assert twin.ids == [1, 2, 3, 3] and history.ids == [1, 2, 3, 4]
    assert dict(zip(*(a.tolist() for a in twin.generated_counts()), strict=True)) == {3: 2}
    assert dict(zip(*(a.tolist() for a in history.generated_counts()), strict=True)) == {
        3: 1,
        4: 1,
    }
    assert set(twin.ngram_bans(2)) == {3} and set(history.ngram_bans(2)) == set()


def test_the_pipeline_on_a_growing_history_equals_the_pipeline_on_fresh_ones() -> None:
    """A row's history is read every step and appended to between steps (as the
    scheduler does); each step's scores equal those of a row built from scratch."""
    rng = random.Random(7)
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, no_repeat_ngram_size=2
    )
    vocab = 24
    pipeline = LogitsPipeline(vocab)
    ids = [rng.randrange(vocab) for _ in range(5)]
    live = decode_row(list(ids), params, prompt_len=5)
    for _ in range(30):
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(len(ids)))
        fresh = decode_row(list(live.token_ids), params, prompt_len=5)
        got = pipeline(logits.clone(), [live]).scores
        expected = pipeline(logits.clone(), [fresh]).scores
        assert torch.equal(got, expected)
        live.history.append(rng.randrange(vocab))
