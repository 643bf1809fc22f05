"""The engine on the real SmolLM2-135M-Instruct (converted once from the embedded GGUF)."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers import Collected, collect, drive, reference_greedy

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.events import TokenEvent
from treadle.scheduler.generation_request import ChatMessage, GenerationRequest
from treadle.worker.loader import LoadedModel

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a short tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Describe the color blue to someone who cannot see.",
    "List two benefits of drinking water.",
    "What does a bee make?",
    "Tell me a fun fact about octopuses, briefly.",
]


@pytest.fixture(scope="module")
def engine(smol: LoadedModel) -> Engine:
    return Engine(smol, EngineConfig(max_batch_rows=8, max_seq_len=256, step_token_budget=128))


def chat(question: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage("user", question)], **kw)  # type: ignore[arg-type]


def test_greedy_batched_equals_generate_alone(engine: Engine, smol: LoadedModel) -> None:
    rng = random.Random(0)
    arrivals = []
    for i in range(24):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            q = "Please answer briefly. " * rng.randint(1, 4) + q  # longer prompts
        gen = chat(q, max_new_tokens=rng.randint(4, 28), request_id=f"q{i}")
        arrivals.append((rng.randint(0, 20), gen))
    got = drive(engine, arrivals)
    for _, gen in arrivals:
        assert gen.request_id is not None
        prompt = engine.inputs.prompt_ids(gen)
        want = reference_greedy(smol.model, prompt, gen.max_new_tokens or 0, 2)
        assert got[gen.request_id].tokens == want, gen.request_id
        text = smol.tokenizer.decode(want, skip_special_tokens=True)
        assert got[gen.request_id].text == text


def test_stop_string_spanning_tokens_never_leaks(engine: Engine) -> None:
    # Greedy SmolLM2 answers "The capital of France is Paris."; " France" and " is"
    # are separate tokens, so "France is" spans a boundary.
    gen = chat(QUESTIONS[0], max_new_tokens=20, stop=["France is"], request_id="s")
    got = drive(engine, [(0, gen)])["s"]
    assert got.finish.reason is FinishReason.STOP_SEQUENCE
    assert got.finish.stop_sequence == "France is"
    assert got.text == "The capital of "
    streamed = ""
    for e in got.events:
        if isinstance(e, TokenEvent):
            streamed += e.text
            assert "Fr" not in streamed


def test_multi_token_stop_word_and_chat_end_marker(engine: Engine) -> None:
    # " Paris." is two tokens; the chat end marker is only visible with special tokens kept.
    paris = chat(
        QUESTIONS[0],
        max_new_tokens=20,
        stop=["Paris."],
        include_stop_in_output=True,
        request_id="p",
    )
    marker = chat(
        QUESTIONS[0],
        max_new_tokens=20,
        ignore_eos=True,
        skip_special_tokens=False,
        stop=["<|im_end|>"],
        request_id="m",
    )
    got = drive(engine, [(0, paris), (0, marker)])
    assert got["p"].text == "The capital of France is Paris."
    assert got["p"].finish.reason is FinishReason.STOP_SEQUENCE
    assert got["m"].finish.reason is FinishReason.STOP_SEQUENCE
    assert got["m"].text == "The capital of France is Paris."


def test_eos_ends_a_chat_answer(engine: Engine) -> None:
    got = drive(engine, [(0, chat(QUESTIONS[0], max_new_tokens=40, request_id="e"))])["e"]
    assert got.finish.reason is FinishReason.EOS
    assert got.text == "The capital of France is Paris."
    assert got.tokens[-1] == 2


def test_cancel_through_the_async_api_frees_the_row(engine: Engine) -> None:
    engine.start()
    try:

        async def scenario() -> tuple[Collected, Collected]:
            long = chat(QUESTIONS[2], max_new_tokens=200, ignore_eos=True, request_id="long")
            short = chat(QUESTIONS[1], max_new_tokens=12, ignore_eos=True, request_id="short")
            cancelled = Collected()
            stream = engine.stream(long)
            other = asyncio.ensure_future(collect(engine, short))
            async for event in stream:
                cancelled.events.append(event)
                if isinstance(event, TokenEvent) and len(cancelled.tokens) == 3:
                    stream.cancel()
            return cancelled, await other

        cancelled, other = asyncio.run(scenario())
    finally:
        engine.stop()
    assert cancelled.finish.reason is FinishReason.CANCELLED
    assert 3 <= len(cancelled.tokens) < 200
    assert other.finish.reason is FinishReason.LENGTH and len(other.tokens) == 12
    assert engine.scheduler.num_running == 0
