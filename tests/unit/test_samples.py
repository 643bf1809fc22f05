"""n samples per request: forked from one prefill, each equal to its own single request."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from helpers import Collected, drive, pool_bytes, reference_greedy, run_checked, run_step

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.events import FinishEvent
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel
from treadle.worker.plan import StepPlan

BLOCK = 4


def engine_for(tiny: LoadedModel, **config: Any) -> Engine:
    settings = {
        "max_batch_rows": 8,
        "max_seq_len": 128,
        "step_token_budget": 5,  # prompts go in chunks
        "block_size": BLOCK,
        **config,
    }
    return Engine(tiny, EngineConfig(**settings))


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed * 1000 + length)
    return [rng.randrange(3, 40000) for _ in range(length)]


def request(prompt: list[int], rid: str, **params: Any) -> GenerationRequest:
    settings: dict[str, Any] = {"max_new_tokens": 12, "ignore_eos": True, **params}
    return GenerationRequest(prompt_token_ids=prompt, request_id=rid, **settings)


def recording_plans(engine: Engine) -> list[StepPlan]:
    """Record every plan the worker executes."""
    plans: list[StepPlan] = []
    execute = engine.worker.execute

    def recording(plan: StepPlan) -> Any:
        plans.append(plan)
        return execute(plan)

    engine.worker.execute = recording  # type: ignore[method-assign]
    return plans


@pytest.mark.parametrize("length", [1, 4, 5, 8, 11])
def test_greedy_samples_share_the_prompt_and_equal_generate(tiny: LoadedModel, length: int) -> None:
    """Every prompt-length case of the fork: nothing to share (1), a full last block
    before the fork point (5: 4 computed tokens), a partial one (4, 8, 11)."""
    engine = engine_for(tiny)
    plans = recording_plans(engine)
    prompt = prompt_of(length)
    got, _ = run_checked(engine, [request(prompt, "g", n=3)])
    want = reference_greedy(tiny.model, prompt, 12, None)
    for i in range(3):
        sample = got["g"].sample(i)
        assert sample.tokens == want, i
        assert sample.finish.reason is FinishReason.LENGTH and sample.finish.index == i
    full, partial = divmod(length - 1, BLOCK)
    copies = [c for p in plans for c in p.copies]
    assert len(copies) == (2 if partial else 0)  # one copy of the partial block per follower
    fork = next(p for p in plans if any(r.sample > 0 for r in p.rows))
    tables = {r.sample: list(r.block_table) for r in fork.rows}
    assert sorted(tables) == [0, 1, 2]
    assert tables[1][:full] == tables[2][:full] == tables[0][:full]  # shared full blocks
    if partial:
        assert len({t[full] for t in tables.values()}) == 3  # each its own copy
        assert {(c.src, c.dst) for c in copies} == {
            (tables[0][full], tables[i][full]) for i in (1, 2)
        }
    prefilled = sum(len(r.input_ids) for p in plans for r in p.rows if r.start < length - 1)
    assert prefilled == length - 1  # the shared part of the prompt was computed once


def test_each_seeded_sample_equals_a_single_request_with_its_seed(tiny: LoadedModel) -> None:
    prompt = prompt_of(10, seed=3)
    params = {"temperature": 0.9, "top_k": 50, "seed": 77}
    got, _ = run_checked(engine_for(tiny), [request(prompt, "s", n=4, **params)])
    singles = []
    for i in range(4):
        alone = drive(engine_for(tiny), [(0, request(prompt, "one", **{**params, "seed": 77 + i}))])
        singles.append(alone["one"].tokens)
        assert got["s"].sample(i).tokens == alone["one"].tokens, i
    assert len({tuple(t) for t in singles}) > 1  # the seeds really differ


def test_samples_in_an_oversubscribed_pool_are_preempted_and_resume_unchanged(
    tiny: LoadedModel,
) -> None:
    gens = [
        request(prompt_of(6 + 3 * i, seed=i), f"q{i}", n=2, temperature=0.8, seed=10 + i)
        for i in range(4)
    ]
    need = sum(2 * (len(g.prompt_token_ids or []) + 12) for g in gens)
    tight = engine_for(tiny, kv_cache_memory=pool_bytes(tiny, need // 2))
    got, preempted = run_checked(tight, gens)
    assert preempted > 0
    roomy, none = run_checked(engine_for(tiny), gens)
    assert none == 0
    for g in gens:
        rid = g.request_id or ""
        for i in range(2):
            assert got[rid].sample(i).tokens == roomy[rid].sample(i).tokens, (rid, i)


@pytest.mark.parametrize("at_step", [0, 2, 6])
def test_an_abort_ends_every_sample_and_frees_every_block(tiny: LoadedModel, at_step: int) -> None:
    """Aborted while the leader waits with its samples held (0), while it prefills (2),
    and after the fork (6)."""
    engine = engine_for(tiny, max_batch_rows=3)
    got: dict[str, Collected] = {}
    gens = [request(prompt_of(3, seed=9), "busy", n=3), request(prompt_of(13), "x", n=3)]
    for g in gens:
        sink = got.setdefault(g.request_id or "", Collected()).events.extend
        engine.scheduler.add(engine.factory.build(g, g.request_id or "", sink))
    for step in range(200):
        if step == at_step:
            assert engine.scheduler.abort("x")
        if not engine.scheduler.has_work:
            break
        run_step(engine)
        engine.scheduler.check_invariants()
    assert not engine.scheduler.has_work and engine.scheduler.pool.num_used == 0
    finishes = [e for e in got["x"].events if isinstance(e, FinishEvent)]
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert {f.reason for f in finishes} == {FinishReason.CANCELLED}
    assert [got["busy"].sample(i).finish.reason for i in range(3)] == [FinishReason.LENGTH] * 3


def test_more_samples_than_rows_are_refused_naming_n(tiny: LoadedModel) -> None:
    engine = engine_for(tiny, max_batch_rows=4)
    with pytest.raises(ValidationError, match=r"^n: is 5 samples; the server runs at most 4"):
        engine.factory.build(request([5, 6, 7], "big", n=5), "big", print)
    tiny_pool = engine_for(tiny, kv_cache_memory=pool_bytes(tiny, 32))  # 8 blocks
    with pytest.raises(ValidationError, match=r"^n: 4 samples of a 24-token prompt need 9"):
        tiny_pool.factory.build(request([5] * 24, "wide", n=4, max_new_tokens=4), "wide", print)


def test_the_stream_of_a_request_with_samples_ends_after_its_last_finish(
    tiny: LoadedModel,
) -> None:
    engine = engine_for(tiny)

    async def run() -> list[Any]:
        async with asyncio.timeout(60):
            return [e async for e in engine.generate(request(prompt_of(7), "a", n=3))]

    engine.start()
    try:
        events = asyncio.run(run())
    finally:
        engine.stop()
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert isinstance(events[-1], FinishEvent)
    assert engine.num_in_flight == 0  # the id was released with its last sample
