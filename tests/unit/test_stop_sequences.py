"""Stop token sequences: matched on generated ids like the seed's StopWordsCriteria, their
text held back so a partial sequence never reaches the stream."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import drive, reference_greedy, standard_attention

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.events import TokenEvent
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.stop_sequences import StopSequenceMatcher
from treadle.worker.loader import LoadedModel

PROMPT = [5, 6, 7, 8, 9]


def test_the_matcher_holds_back_a_possible_sequence_and_releases_the_rest() -> None:
    m = StopSequenceMatcher(((3, 4, 5), (9,)))
    assert m.feed(1, "a") == ("a", False)
    assert m.feed(3, "b") == ("", False)  # may begin (3, 4, 5)
    assert m.feed(4, "c") == ("", False)
    assert m.feed(6, "d") == ("bcd", False)  # it did not
    assert m.feed(3, "e") == ("", False)
    assert m.feed(3, "f") == ("e", False)  # the second 3 may still begin it
    assert m.feed(4, "g") == ("", False)
    assert m.feed(5, "h") == ("", True)  # matched: its text is dropped
    kept = StopSequenceMatcher(((3, 4),), keep=True)
    assert kept.feed(3, "x") == ("", False)
    assert kept.feed(4, "y") == ("xy", True)
    held = StopSequenceMatcher(((3, 4),))
    held.feed(3, "x")
    assert held.flush() == "x"


class StopWordsCriteria:
    """The seed's stopping criterion (DeepSeek-VL's serving path): stop once the ids end
    with one of the stop words, given as id sequences."""

    def __init__(self, stops: list[list[int]]) -> None:
        self.stops = [torch.tensor(s) for s in stops]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [
            any(len(row) >= len(s) and torch.equal(row[-len(s) :], s) for s in self.stops)
            for row in input_ids
        ]
        return torch.tensor(done)


def generate_with_stop_words(tiny: LoadedModel, stops: list[list[int]], max_new: int) -> list[int]:
    from transformers import StoppingCriteriaList

    with standard_attention(tiny.model), torch.inference_mode():
        out = tiny.model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([StopWordsCriteria(stops)]),
        )
    return list(out[0, len(PROMPT) :].tolist())


@pytest.mark.parametrize("at", [0, 4, 9])
def test_engine_stops_where_stop_words_criteria_stops(tiny: LoadedModel, at: int) -> None:
    free = reference_greedy(tiny.model, PROMPT, 24, None)
    stops = [free[at : at + 3], [tiny.vocab_size - 1, 7]]  # the second never appears
    want = generate_with_stop_words(tiny, stops, 24)
    engine = Engine(tiny, EngineConfig(max_batch_rows=4, max_seq_len=128, block_size=4))
    gen = GenerationRequest(
        request_id="r",
        prompt_token_ids=PROMPT,
        max_new_tokens=24,
        ignore_eos=True,
        stop_token_sequences=stops,
    )
    got = drive(engine, [(0, gen)])["r"]
    assert got.tokens == want  # the same ids as generate, the sequence's own included
    first = next(i for i in range(len(free)) if free[i : i + 3] == free[at : at + 3])
    assert got.finish.reason is FinishReason.STOP_TOKEN
    assert got.text == tiny.tokenizer.decode(free[:first], skip_special_tokens=True)
    streamed = ""
    for e in got.events:  # never a piece of the sequence's text on the way
        if isinstance(e, TokenEvent):
            streamed += e.text
            assert len(streamed) <= len(got.text)


def test_out_of_vocabulary_and_limits_are_refused(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_rows=4, max_seq_len=128))
    bad = GenerationRequest(prompt_token_ids=PROMPT, stop_token_sequences=[[1, 10**9]])
    with pytest.raises(ValidationError, match=r"stop_token_sequences\[0\]: token id"):
        engine.factory.build(bad, "bad", lambda events: None)
    empty = GenerationRequest(prompt_token_ids=PROMPT, stop_token_sequences=[[]])
    with pytest.raises(ValidationError, match=r"stop_token_sequences\[0\]: must not be empty"):
        engine.factory.build(empty, "empty", lambda events: None)
    many = GenerationRequest(prompt_token_ids=PROMPT, stop_token_sequences=[[1]] * 17)
    with pytest.raises(ValidationError, match="stop_token_sequences: at most 16 sequences"):
        engine.factory.build(many, "many", lambda events: None)
