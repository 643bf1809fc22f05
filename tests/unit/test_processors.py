"""The logits pipeline against transformers' own processors and warpers, row by row.

Every comparison builds transformers' own public processor and warper classes
for one row, in the order `generate` applies them, and runs them on that row
alone; our pipeline processes the whole mixed batch at once. Presence/frequency
penalties, which transformers lacks, are checked against their formula and
slotted into transformers' list right after the repetition penalty.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
import torch
from helpers import decode_row
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from treadle.worker.params import LogprobsParams, SamplingParams
from treadle.worker.plan import RowInput
from treadle.worker.processors import LogitsPipeline, ProcessedLogits
from treadle.worker.processors.batch import StepBatch

V = 96  # small vocabulary: repeated tokens and n-grams are common in random histories


# ---------------------------------------------------------------- helpers


def make_row(token_ids: list[int], prompt_len: int, params: SamplingParams, i: int = 0) -> RowInput:
    return decode_row(token_ids, params, i, prompt_len)


def random_history(rng: random.Random, alphabet: int = 12) -> tuple[list[int], int]:
    """A prompt + generated history drawn from few tokens, so that n-grams repeat."""
    prompt_len = rng.randint(1, 12)
    generated = rng.randint(0, 12)
    return [rng.randrange(alphabet) for _ in range(prompt_len + generated)], prompt_len


class PresenceFrequency(LogitsProcessor):
    """The OpenAI formula, for slotting into transformers' list (it has no equivalent)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        for t in input_ids[0, self.prompt_len :].tolist():
            counts[0, t] += 1
        return scores - self.presence * (counts > 0).float() - self.frequency * counts


def hf_processors(row: RowInput) -> LogitsProcessorList:
    """transformers' processors for one row, built from its public classes in `generate`'s order.

    The order is `GenerationMixin._get_logits_processor`'s (sequence bias, repetition
    penalty, no-repeat n-gram, bad words, min new tokens, prefix-constrained; then, when
    sampling, temperature, top-k, top-p, min-p, typical-p with min_tokens_to_keep=1).
    """
    p = row.params
    eos = torch.tensor(list(p.min_tokens_suppressed)) if p.min_tokens_suppressed else None
    allowed = list(p.allowed_token_ids)
    processors = LogitsProcessorList()
    if p.logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in p.logit_bias]))
    if p.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:  # treadle's own, right after repetition
        processors.append(
            PresenceFrequency(p.presence_penalty, p.frequency_penalty, row.prompt_len)
        )
    if p.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if p.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor([list(s) for s in p.bad_words_ids], eos))
    if p.min_new_tokens and eos is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(row.prompt_len, p.min_new_tokens, eos))
    if allowed:
        processors.append(PrefixConstrainedLogitsProcessor(lambda batch_id, ids: allowed, 1))
    if p.temperature > 0:
        if p.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            processors.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            processors.append(TopPLogitsWarper(p.top_p))
        if p.min_p:
            processors.append(MinPLogitsWarper(p.min_p))
        if p.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(p.typical_p))
    return processors


def hf_reference(row: RowInput, logits: torch.Tensor) -> torch.Tensor:
    """transformers' processing of one row's logits `[V]`."""
    input_ids = torch.tensor([list(row.token_ids)])  # [1, T]
    return hf_processors(row)(input_ids, logits.clone().unsqueeze(0))[0]


def assert_rows_match(rows: list[RowInput], logits: torch.Tensor, out: torch.Tensor) -> None:
    for i, row in enumerate(rows):
        expected = hf_reference(row, logits[i])
        assert torch.equal(out[i].isneginf(), expected.isneginf()), f"row {i}: -inf differ"
        finite = ~expected.isneginf()
        torch.testing.assert_close(out[i][finite], expected[finite], msg=f"row {i}: {row.params}")


def run_pipeline(rows: list[RowInput], logits: torch.Tensor) -> ProcessedLogits:
    return LogitsPipeline(logits.shape[1])(logits.clone(), rows)


def random_params(rng: random.Random) -> SamplingParams:
    """Each option on or off at random, with random values (never EOS among bad words)."""
    suppressed = tuple(rng.sample(range(V), rng.randint(1, 3)))
    single_bad = [t for t in rng.sample(range(12), 2) if t not in suppressed]
    p = SamplingParams(
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.7, -0.3]),
        no_repeat_ngram_size=rng.choice([0, 0, 1, 2, 3]),
        bad_words_ids=rng.choice([(), (*((t,) for t in single_bad), (3, 4), (5, 6, 7))]),
        logit_bias=rng.choice([(), ((1, 5.0), (2, -2.5), (50, 1.5))]),
        allowed_token_ids=rng.choice([(), (), tuple(sorted(rng.sample(range(V), 20)))]),
        min_new_tokens=rng.choice([0, 5, 100]),
        min_tokens_suppressed=suppressed,
    )
    if rng.random() < 0.6:
        p = replace(
            p,
            temperature=rng.choice([0.5, 1.0, 1.7]),
            top_k=rng.choice([0, 0, 5, 40]),
            top_p=rng.choice([1.0, 0.9, 0.5]),
            min_p=rng.choice([0.0, 0.05, 0.2]),
            typical_p=rng.choice([1.0, 0.95, 0.6]),
        )
    return p


# ---------------------------------------------------------------- each stage alone

STAGES: dict[str, list[dict[str, Any]]] = {
    "logit_bias": [{"logit_bias": ((3, 2.0), (7, -1.5))}, {"logit_bias": ((90, 10.0),)}],
    "repetition_penalty": [{"repetition_penalty": 1.5}, {"repetition_penalty": 0.7}],
    "no_repeat_ngram_size": [
        {"no_repeat_ngram_size": 1},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3},
    ],
    "bad_words_ids": [
        {"bad_words_ids": ((4,), (1, 2), (3, 5, 6))},
        {"bad_words_ids": ((0, 1), (2, 3), (4, 5))},
    ],
    "min_new_tokens": [
        {"min_new_tokens": 100, "min_tokens_suppressed": (0, 9)},
        {"min_new_tokens": 2, "min_tokens_suppressed": (11,)},
    ],
    "allowed_token_ids": [{"allowed_token_ids": (1, 5, 9, 40)}, {"allowed_token_ids": (0, 2)}],
    "temperature": [{"temperature": 0.6}, {"temperature": 1.8}],
    "top_k": [{"temperature": 1.0, "top_k": 1}, {"temperature": 1.0, "top_k": 7}],
    "top_p": [{"temperature": 1.0, "top_p": 0.3}, {"temperature": 1.0, "top_p": 0.92}],
    "min_p": [{"temperature": 1.0, "min_p": 0.1}, {"temperature": 1.0, "min_p": 0.6}],
    "typical_p": [{"temperature": 1.0, "typical_p": 0.4}, {"temperature": 1.0, "typical_p": 0.9}],
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_matches_transformers_on_the_rows_that_enable_it(stage: str) -> None:
    rng = random.Random(stage)
    variants = [*STAGES[stage], {}, {"temperature": 1.0}]  # last two: nothing to do
    rows = []
    for i in range(8):
        ids, prompt_len = random_history(rng)
        rows.append(make_row(ids, prompt_len, SamplingParams(**variants[i % len(variants)]), i))
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(len(stage))) * 3
    out = run_pipeline(rows, logits)
    assert out.errors == {}
    assert_rows_match(rows, logits, out.scores)
    enabled = [
        i
        for i, r in enumerate(rows)
        if r.params not in (SamplingParams(), SamplingParams(temperature=1.0))
    ]
    assert any(not torch.equal(out.scores[i], logits[i]) for i in enabled), "stage did nothing"
    for i, r in enumerate(rows):
        if r.params in (SamplingParams(), SamplingParams(temperature=1.0)):
            assert torch.equal(out.scores[i], logits[i])


# ---------------------------------------------------------------- combinations


@pytest.mark.parametrize("seed", range(6))
def test_mixed_batch_of_random_combinations_matches_transformers_row_by_row(seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(10):
        ids, prompt_len = random_history(rng)
        params = SamplingParams() if i == 0 else random_params(rng)
        rows.append(make_row(ids, prompt_len, params, i))
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(seed)) * 2.5
    out = run_pipeline(rows, logits)
    assert_rows_match(rows, logits, out.scores)


@pytest.mark.parametrize(
    ("allowed", "top_k"),
    [
        (tuple(range(0, V, 2)), 30),  # wide rows: every warper on full rows
        (tuple(range(0, V, 2)), 5),  # packed by top-k
        (tuple(range(3, V, 9)), 6),  # a short allowed list, then packed by top-k
        (tuple(range(3, V, 9)), 0),  # packed because of the short allowed list
    ],
)
def test_every_stage_on_every_row(allowed: tuple[int, ...], top_k: int) -> None:
    rng = random.Random(7)
    params = SamplingParams(
        temperature=0.8,
        top_k=top_k,
        top_p=0.9,
        min_p=0.02,
        typical_p=0.95,
        repetition_penalty=1.2,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        no_repeat_ngram_size=2,
        bad_words_ids=((8,), (1, 2)),
        logit_bias=((4, 3.0),),
        allowed_token_ids=allowed,
        min_new_tokens=50,
        min_tokens_suppressed=(0,),
    )
    rows = [make_row(*random_history(rng), params, i) for i in range(6)]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(1)) * 3
    assert_rows_match(rows, logits, run_pipeline(rows, logits).scores)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=1.0, typical_p=0.9),
        SamplingParams(temperature=1.0, typical_p=0.2),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.8, typical_p=0.9),
    ],
)
def test_top_p_and_typical_p_on_a_wide_vocabulary(params: SamplingParams) -> None:
    """Flat and peaked rows over 4096 tokens: the ranking has to widen past its first guess."""
    vocab = 4096
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([[0.3], [1.0], [3.0], [8.0]])  # from nearly flat to peaked
    logits = torch.randn(4, vocab, generator=g) * scale
    rows = [make_row([1, 2, 3], 2, params, i) for i in range(4)]
    out = LogitsPipeline(vocab)(logits.clone(), rows).scores
    assert_rows_match(rows, logits, out)


def test_allowed_tokens_all_banned_are_forced_back_like_transformers() -> None:
    params = SamplingParams(bad_words_ids=((5,), (6,)), allowed_token_ids=(5, 6))
    rows = [make_row([1, 2], 1, params, 0), make_row([1, 2], 1, SamplingParams(), 1)]
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    out = run_pipeline(rows, logits).scores
    assert_rows_match(rows, logits, out)
    assert out[0, 5] == 0 and out[0, 6] == 0 and int(out[0].isfinite().sum()) == 2


# ---------------------------------------------------------------- presence / frequency


def test_presence_and_frequency_follow_the_openai_formula_on_generated_tokens_only() -> None:
    prompt = [7, 7, 7, 3]  # prompt tokens are not penalised
    generated = [3, 3, 9, 1, 3]
    rows = [
        make_row(prompt + generated, len(prompt), SamplingParams(presence_penalty=0.5), 0),
        make_row(prompt + generated, len(prompt), SamplingParams(frequency_penalty=0.25), 1),
        make_row(
            prompt + generated,
            len(prompt),
            SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0),
            2,
        ),
        make_row(prompt, len(prompt), SamplingParams(presence_penalty=1.0), 3),  # nothing yet
    ]
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    out = run_pipeline(rows, logits).scores
    counts = torch.zeros(V)
    for t in generated:
        counts[t] += 1
    for i, (presence, frequency) in enumerate([(0.5, 0.0), (0.0, 0.25), (-1.0, 2.0)]):
        expected = logits[i] - presence * (counts > 0).float() - frequency * counts
        torch.testing.assert_close(out[i], expected)
    assert out[2, 3] == pytest.approx(float(logits[2, 3]) + 1.0 - 2.0 * 3)
    assert out[0, 7] == logits[0, 7]  # only in the prompt
    assert torch.equal(out[3], logits[3])


# ---------------------------------------------------------------- fast path and contract


def test_nothing_enabled_returns_the_same_tensor_untouched() -> None:
    rows = [
        make_row([1, 2, 3], 2, SamplingParams(), 0),
        make_row([4], 1, SamplingParams(seed=3, logprobs=LogprobsParams(top_n=2)), 1),
        make_row([5, 6], 1, SamplingParams(min_new_tokens=4), 2),  # nothing to suppress
    ]
    logits = torch.randn(3, V)
    before = logits.clone()
    out = LogitsPipeline(V)(logits, rows)
    assert out.scores is logits
    assert torch.equal(logits, before)
    assert out.errors == {}


def test_min_new_tokens_stops_suppressing_once_reached() -> None:
    params = SamplingParams(min_new_tokens=2, min_tokens_suppressed=(0, 1))
    rows = [make_row([5, 6, 7], 2, params, 0), make_row([5, 6, 7, 8], 2, params, 1)]
    out = run_pipeline(rows, torch.zeros(2, V)).scores
    assert out[0, 0] == -torch.inf and out[0, 1] == -torch.inf  # 1 generated < 2
    assert torch.equal(out[1], torch.zeros(V))  # 2 generated


def test_wrong_logits_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocabulary width 96"):
        LogitsPipeline(V)(torch.zeros(1, V + 1), [make_row([1], 1, SamplingParams())])


def test_history_ids_past_the_score_width_are_ignored() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, no_repeat_ngram_size=1)
    rows = [make_row([1, V + 5, 2, V + 5], 1, params)]
    logits = torch.ones(1, V)
    out = run_pipeline(rows, logits).scores
    assert out[0, 1] == -torch.inf and out[0, 2] == -torch.inf
    assert int(out[0].isfinite().sum()) == V - 2


def test_step_batch_flattens_the_histories_statistics() -> None:
    rows = [
        make_row([1, 2, 3, 2, 4, 4], 2, SamplingParams(), 0),
        make_row([5], 1, SamplingParams(), 1),
        make_row([6, 7, 6, 7], 1, SamplingParams(), 2),
    ]
    batch = StepBatch(rows, torch.device("cpu"))
    row, ids = batch.seen([0, 1, 2])
    assert row.tolist() == [0, 0, 0, 0, 1, 2, 2] and ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    row, ids, counts = batch.generated_counts([0, 1, 2])
    assert row.tolist() == [0, 0, 0, 2, 2]
    assert ids.tolist() == [3, 2, 4, 7, 6] and counts.tolist() == [1, 1, 2, 2, 1]
