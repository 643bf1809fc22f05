"""The engine on a tiny random llama: batched output equals transformers' own, alone."""

from __future__ import annotations

import gc
import random
import threading
from typing import Any

import pytest
import torch
from helpers import (
    BanEverything,
    Collected,
    Exploding,
    collect,
    collect_all,
    drive,
    pool_bytes,
    reference_greedy,
    run_checked,
)

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import QueueFullError, ValidationError
from treadle.scheduler.generation_request import GenerationRequest, PluginRequest
from treadle.scheduler.step_stats import StepStats
from treadle.worker.loader import LoadedModel
from treadle.worker.plugins import default_registry


def tiny_engine(tiny: LoadedModel, **config: Any) -> Engine:
    settings = {"max_batch_rows": 8, "max_seq_len": 128, "step_token_budget": 64, **config}
    return Engine(tiny, EngineConfig(**settings))


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 40000) for _ in range(n)]


def test_greedy_batched_equals_generate_alone(tiny: LoadedModel) -> None:
    rng = random.Random(0)
    requests = []
    for i in range(28):
        prompt = random_prompt(rng, rng.randint(1, 60))
        budget = rng.randint(1, 40)
        arrival = rng.randint(0, 30)
        requests.append(
            (
                arrival,
                GenerationRequest(
                    prompt_token_ids=prompt, max_new_tokens=budget, request_id=f"r{i}"
                ),
            )
        )
    expected = {
        g.request_id: reference_greedy(
            tiny.model, g.prompt_token_ids or [], g.max_new_tokens or 0, 2
        )
        for _, g in requests
    }
    engine = tiny_engine(tiny)  # 8 rows for 28 requests: rows are freed and reused
    got = drive(engine, requests)
    budgets = {g.request_id: g.max_new_tokens for _, g in requests}
    for rid, want in expected.items():
        assert got[rid].tokens == want, rid
        full = len(want) == budgets[rid]
        assert got[rid].finish.reason is (FinishReason.LENGTH if full else FinishReason.EOS)


def test_starting_an_engine_freezes_what_is_alive(tiny: LoadedModel) -> None:
    """The model and everything else alive at start leave the collector's full passes."""
    gc.unfreeze()
    engine = tiny_engine(tiny)
    assert id(tiny.model) in {id(o) for o in gc.get_objects()}
    engine.start()
    try:
        assert gc.get_freeze_count() > 0
        assert id(tiny.model) not in {id(o) for o in gc.get_objects()}  # frozen: not walked
    finally:
        engine.stop()


def test_async_api_matches_step_driver(tiny: LoadedModel) -> None:
    rng = random.Random(1)
    gens = [
        GenerationRequest(
            prompt_token_ids=random_prompt(rng, 5 + i), max_new_tokens=6 + i, request_id=f"a{i}"
        )
        for i in range(10)
    ]
    want = {
        g.request_id: reference_greedy(
            tiny.model, g.prompt_token_ids or [], g.max_new_tokens or 0, 2
        )
        for g in gens
    }
    engine = tiny_engine(tiny, max_batch_rows=4)
    engine.start()
    try:
        import asyncio

        results = asyncio.run(collect_all(engine, gens))
    finally:
        engine.stop()
    for g, r in zip(gens, results, strict=True):
        assert r.tokens == want[g.request_id]


def seeded(prompt: list[int], rid: str, seed: int | None = 1234) -> GenerationRequest:
    return GenerationRequest(
        prompt_token_ids=prompt,
        max_new_tokens=24,
        temperature=0.9,
        top_p=0.95,
        top_k=50,
        seed=seed,
        request_id=rid,
        ignore_eos=True,
    )


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(tiny: LoadedModel) -> None:
    rng = random.Random(2)
    prompt = random_prompt(rng, 12)
    alone = drive(tiny_engine(tiny), [(0, seeded(prompt, "s"))])["s"].tokens
    busy: list[tuple[int, GenerationRequest]] = [(3, seeded(prompt, "s"))]
    for i in range(12):  # greedy, unseeded sampled and other-seed rows around it
        kind = i % 3
        gen = GenerationRequest(
            prompt_token_ids=random_prompt(rng, rng.randint(2, 40)),
            max_new_tokens=rng.randint(5, 30),
            temperature=0.0 if kind == 0 else 1.3,
            seed=None if kind != 2 else 99 + i,
            repetition_penalty=1.2 if kind == 1 else 1.0,
            request_id=f"o{i}",
        )
        busy.append((rng.randint(0, 6), gen))
    with_others = drive(tiny_engine(tiny, max_batch_rows=6), busy)
    assert with_others["s"].tokens == alone
    assert len(alone) == 24
    other_seed = drive(tiny_engine(tiny), [(0, seeded(prompt, "s", seed=4321))])["s"].tokens
    assert other_seed != alone


def test_cancel_frees_the_row_and_the_others_are_unaffected(tiny: LoadedModel) -> None:
    rng = random.Random(3)
    gens = [
        GenerationRequest(
            prompt_token_ids=random_prompt(rng, 8),
            max_new_tokens=40,
            request_id=f"c{i}",
            ignore_eos=True,
        )
        for i in range(3)
    ]
    want = {
        g.request_id: reference_greedy(tiny.model, g.prompt_token_ids or [], 40, None) for g in gens
    }
    engine = tiny_engine(tiny, max_batch_rows=2)
    got: dict[str, Collected] = {}
    for g in gens:
        assert g.request_id is not None
        engine.scheduler.add(
            engine.factory.build(
                g, g.request_id, got.setdefault(g.request_id, Collected()).events.extend
            )
        )
    rows_seen = []
    for step in range(200):
        if step == 5:
            assert engine.scheduler.abort("c0")
        plan = engine.scheduler.schedule()
        rows_seen.append({r.request_id for r in plan.rows})
        if plan.is_empty:
            break
        engine.scheduler.update(plan, engine.worker.execute(plan))
        for req, events in engine.scheduler.take_events():
            req.sink(events)
    assert got["c0"].finish.reason is FinishReason.CANCELLED
    assert got["c0"].tokens == want["c0"][:5]
    # c2 waited for a row; it got c0's right after the cancel
    assert rows_seen[5] == {"c1", "c2"}
    assert engine.scheduler.num_running == 0
    assert got["c1"].tokens == want["c1"]
    assert got["c2"].tokens == want["c2"]


def test_validation_errors_name_the_field(tiny: LoadedModel) -> None:
    engine = tiny_engine(tiny)
    engine.start()
    try:
        cases = {
            "token_ids": GenerationRequest(prompt_token_ids=[5] * 200),
            "max_new_tokens": GenerationRequest(prompt_token_ids=[5] * 100, max_new_tokens=50),
            "temperature": GenerationRequest(prompt="hi", temperature=-1.0),
            "top_p": GenerationRequest(prompt="hi", top_p=0.0),
            "input": GenerationRequest(),
            "plugins[0].name": GenerationRequest(prompt="hi", plugins=[PluginRequest("nope")]),
            "stop": GenerationRequest(prompt="hi", stop=["x"] * 17),
            "token_ids.ids[1]": GenerationRequest(prompt_token_ids=[5, 10**9]),
            "top_logprobs": GenerationRequest(prompt="hi", top_logprobs=21),
        }
        for field, gen in cases.items():
            with pytest.raises(ValidationError) as info:
                engine.submit(gen, lambda events: None)
            assert info.value.field == field, str(info.value)
        assert engine.num_in_flight == 0  # nothing was queued
        with pytest.raises(ValidationError, match=r"limit is 127"):
            engine.submit(GenerationRequest(prompt_token_ids=[5] * 200), lambda e: None)
    finally:
        engine.stop()


def test_queue_limit(tiny: LoadedModel) -> None:
    engine = tiny_engine(tiny, max_batch_rows=1, max_waiting=1)
    running = threading.Event()
    engine.step_observers.append(lambda s: running.set() if s.running >= 1 else None)
    engine.start()
    try:
        long = GenerationRequest(prompt="x", max_new_tokens=120, ignore_eos=True)
        first = engine.submit(long, lambda e: None)
        assert running.wait(30)
        engine.submit(long, lambda e: None)  # waits: the one row is taken
        with pytest.raises(QueueFullError):
            engine.submit(long, lambda e: None)
        engine.abort(first)
    finally:
        engine.stop()
    assert engine.num_in_flight == 0


def test_a_failing_plugin_ends_only_its_request(tiny: LoadedModel) -> None:
    plugins = default_registry()
    plugins.register("explode", Exploding())
    engine = Engine(tiny, EngineConfig(max_batch_rows=4, max_seq_len=128), plugins)
    rng = random.Random(4)
    good = GenerationRequest(
        prompt_token_ids=random_prompt(rng, 6),
        max_new_tokens=10,
        request_id="good",
        ignore_eos=True,
    )
    bad = GenerationRequest(
        prompt_token_ids=random_prompt(rng, 6),
        max_new_tokens=10,
        request_id="bad",
        plugins=[PluginRequest("explode")],
    )
    got = drive(engine, [(0, good), (2, bad)])
    assert got["bad"].finish.reason is FinishReason.ERROR
    message = got["bad"].finish.message or ""  # generic: the plugin's name and an error id
    assert "explode" in message and "error id" in message and "kaboom" not in message
    assert got["good"].finish.reason is FinishReason.LENGTH
    assert got["good"].tokens == reference_greedy(tiny.model, good.prompt_token_ids or [], 10, None)


def test_confidence_stop_plugin_ends_with_stop_criterion(tiny: LoadedModel) -> None:
    engine = tiny_engine(tiny)
    gen = GenerationRequest(
        prompt_token_ids=[100, 200, 300],
        max_new_tokens=30,
        temperature=1.0,
        seed=7,
        request_id="c",
        ignore_eos=True,
        plugins=[PluginRequest("confidence_stop", {"threshold": 0.999, "window": 2})],
    )
    got = drive(engine, [(0, gen)])["c"]
    assert got.finish.reason is FinishReason.STOP_CRITERION
    assert got.finish.usage.generated_tokens == 2


def test_logprobs_match_the_model(tiny: LoadedModel) -> None:
    prompt = [11, 22, 33, 44]
    engine = tiny_engine(tiny)
    gen = GenerationRequest(
        prompt_token_ids=prompt, max_new_tokens=3, logprobs=True, top_logprobs=3, request_id="l"
    )
    got = drive(engine, [(0, gen)])["l"]
    from helpers import standard_attention

    ids = list(prompt)
    events = [e for e in got.events if hasattr(e, "logprobs")]
    for event in events:
        with standard_attention(tiny.model), torch.inference_mode():
            logits = tiny.model(torch.tensor([ids])).logits[0, -1]
        ref = torch.log_softmax(logits.float(), -1)
        lp = event.logprobs[0]
        assert lp.token_id == event.token_ids[0] == int(ref.argmax())
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-4)
        top = torch.topk(ref, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        ids.append(lp.token_id)


def test_step_stats_are_observed(tiny: LoadedModel) -> None:
    engine = tiny_engine(tiny)
    seen: list[StepStats] = []
    engine.step_observers.append(seen.append)
    engine.start()
    try:
        import asyncio

        got = asyncio.run(
            collect(engine, GenerationRequest(prompt="hello", max_new_tokens=5, ignore_eos=True))
        )
    finally:
        engine.stop()
    assert got.finish.usage.generated_tokens == 5
    assert sum(s.generated_tokens for s in seen) == 5
    assert all(s.forward_seconds <= s.step_seconds for s in seen)


def test_prefix_cache_hits_give_the_same_tokens(tiny: LoadedModel) -> None:
    rng = random.Random(5)
    shared = random_prompt(rng, 30)
    prompts = [shared + random_prompt(rng, rng.randint(1, 12)) for _ in range(8)]
    prompts.append(list(shared))  # a prompt equal to a cached prefix: one token left to prefill
    prompts.append(prompts[0])  # the same prompt again
    arrivals = [
        (
            i * 3,
            GenerationRequest(
                prompt_token_ids=p, max_new_tokens=8, request_id=f"p{i}", ignore_eos=True
            ),
        )
        for i, p in enumerate(prompts)
    ]
    engine = tiny_engine(tiny, max_batch_rows=3, block_size=4)
    got = drive(engine, arrivals)
    cached = [got[f"p{i}"].finish.usage.cached_prompt_tokens for i in range(len(prompts))]
    # the 30 shared tokens are 7 full blocks of 4 and 2 tokens of a cached 8th block,
    # which each request copies (the hit ends mid-block)
    assert cached[0] == 0 and all(c >= 30 for c in cached[1:-2])
    assert cached[-2] == 29  # a prompt equal to the prefix keeps a token to compute
    assert cached[-1] == len(prompts[0]) - 1
    for i, p in enumerate(prompts):
        assert got[f"p{i}"].tokens == reference_greedy(tiny.model, p, 8, None), i


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_request_whose_constraints_rule_out_every_token_ends_in_error(
    tiny: LoadedModel, temperature: float
) -> None:
    plugins = default_registry()
    plugins.register("ban_everything", BanEverything())
    engine = Engine(tiny, EngineConfig(max_batch_rows=4, max_seq_len=128), plugins)
    rng = random.Random(5)
    good = GenerationRequest(
        prompt_token_ids=random_prompt(rng, 6), max_new_tokens=8, request_id="good"
    )
    stuck = GenerationRequest(
        prompt_token_ids=random_prompt(rng, 6),
        max_new_tokens=8,
        request_id="stuck",
        temperature=temperature,
        seed=1,
        plugins=[PluginRequest("ban_everything")],
    )
    got = drive(engine, [(0, good), (1, stuck)])
    assert got["stuck"].finish.reason is FinishReason.ERROR
    assert "no possible next token" in (got["stuck"].finish.message or "")
    assert got["stuck"].tokens == []
    assert got["good"].finish.reason is not FinishReason.ERROR


def test_stop_with_grace_waits_for_a_request_the_step_thread_has_not_seen(
    tiny: LoadedModel,
) -> None:
    engine = tiny_engine(tiny)
    drained, go = threading.Event(), threading.Event()
    drain = engine._drain_inbox
    first = [True]

    def held_drain() -> None:  # the step thread drains an empty inbox, then waits here
        drain()
        if first and first.pop():
            drained.set()
            assert go.wait(30)

    engine._drain_inbox = held_drain  # type: ignore[method-assign]
    engine.start()
    assert drained.wait(30)
    got = Collected()
    engine.submit(
        GenerationRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=60, ignore_eos=True),
        got.events.extend,
    )
    stopper = threading.Thread(target=engine.stop, kwargs={"grace": 60})
    stopper.start()
    go.set()  # the thread finds no work yet: the engine must not count as idle
    stopper.join(90)
    assert not stopper.is_alive()
    assert got.finish.reason is FinishReason.LENGTH
    assert len(got.tokens) == 60


def test_open_stream_cancelled_while_building_aborts_the_request(tiny: LoadedModel) -> None:
    import asyncio

    engine = tiny_engine(tiny)
    building, release, ended = threading.Event(), threading.Event(), threading.Event()
    finishes: list[FinishReason] = []
    build = engine.factory.build

    def slow_build(*args: Any) -> Any:
        building.set()
        assert release.wait(30)
        return build(*args)

    def observe(stats: StepStats) -> None:
        for event in stats.finished:
            finishes.append(event.reason)
            ended.set()

    engine.factory.build = slow_build  # type: ignore[method-assign]
    engine.step_observers.append(observe)
    gen = GenerationRequest(prompt_token_ids=[5, 6], max_new_tokens=120, ignore_eos=True)

    async def scenario() -> None:
        task = asyncio.create_task(engine.open_stream(gen))
        assert await asyncio.to_thread(building.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await asyncio.to_thread(ended.wait, 30)

    engine.start()
    try:
        asyncio.run(scenario())
        assert engine.wait_until_idle(30)
    finally:
        engine.stop()
    assert finishes == [FinishReason.CANCELLED]  # aborted, not run to its 120 tokens


@pytest.mark.parametrize("opener", ["stream", "open_stream"])
def test_max_backlog_given_at_creation_holds_from_the_first_event(
    tiny: LoadedModel, opener: str
) -> None:
    import asyncio

    from treadle.scheduler.events import Cause, Event

    engine = tiny_engine(tiny)
    gen = GenerationRequest(prompt_token_ids=[5, 6], max_new_tokens=120, ignore_eos=True)

    async def scenario() -> list[Event]:
        if opener == "stream":
            stream = engine.stream(gen, max_backlog=1)
        else:
            stream = await engine.open_stream(gen, max_backlog=1)
        assert stream.max_backlog == 1
        # nobody reads until the engine is idle: the second unread step cuts the request
        assert await asyncio.to_thread(engine.wait_until_idle, 30)
        return [event async for event in stream]

    engine.start()
    try:
        events = asyncio.run(scenario())
    finally:
        engine.stop()
    got = Collected(events)
    assert got.finish.reason is FinishReason.CANCELLED
    assert got.finish.cause is Cause.SLOW_READER
    assert got.tokens == []  # token events are dropped once a request is cut


@pytest.mark.parametrize("budget", [5, 7, 13])
def test_prompts_prefilled_in_chunks_give_the_tokens_of_generate(
    tiny: LoadedModel, budget: int
) -> None:
    rng = random.Random(budget)
    gens = [
        GenerationRequest(
            prompt_token_ids=random_prompt(rng, 17 + 9 * i),
            max_new_tokens=10,
            ignore_eos=True,
            request_id=f"c{i}",
        )
        for i in range(4)
    ]
    engine = tiny_engine(tiny, step_token_budget=budget, block_size=4)
    starts: set[int] = set()
    execute = engine.worker.execute

    def recording(plan: Any) -> Any:
        starts.update(r.start for r in plan.prefill if r.start % 4)
        return execute(plan)

    engine.worker.execute = recording  # type: ignore[method-assign]
    got, _ = run_checked(engine, gens)
    assert starts  # chunks began mid-block, not only on block edges
    for g in gens:
        want = reference_greedy(tiny.model, g.prompt_token_ids or [], 10, None)
        assert got[g.request_id or ""].tokens == want, g.request_id


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_an_oversubscribed_pool_preempts_and_resumes_with_the_same_tokens(
    tiny: LoadedModel, temperature: float
) -> None:
    rng = random.Random(7)
    prompts = [random_prompt(rng, 6 + 2 * i) for i in range(8)]

    def gens() -> list[GenerationRequest]:
        return [
            GenerationRequest(
                prompt_token_ids=p,
                max_new_tokens=30,
                ignore_eos=True,
                temperature=temperature,
                seed=100 + i,
                request_id=f"p{i}",
            )
            for i, p in enumerate(prompts)
        ]

    need = sum(len(p) + 30 for p in prompts)  # what all of them hold at their ends
    tight = tiny_engine(tiny, block_size=4, kv_cache_memory=pool_bytes(tiny, need // 2))
    got, preempted = run_checked(tight, gens())
    assert preempted > 0  # the pool really ran dry
    roomy, none = run_checked(tiny_engine(tiny, block_size=4), gens())
    assert none == 0
    for g in gens():
        rid = g.request_id or ""
        assert got[rid].tokens == roomy[rid].tokens, rid  # no token lost, repeated or changed
        assert got[rid].finish.reason is FinishReason.LENGTH
        if temperature == 0.0:
            assert got[rid].tokens == reference_greedy(
                tiny.model, g.prompt_token_ids or [], 30, None
            )


def test_a_request_the_pool_can_never_hold_is_refused_naming_the_pool(tiny: LoadedModel) -> None:
    engine = tiny_engine(tiny, max_seq_len=None, block_size=4, kv_cache_memory=pool_bytes(tiny, 64))
    assert engine.info.max_total_tokens == 64 and engine.info.kv_cache_tokens == 64
    engine.start()
    try:
        with pytest.raises(ValidationError, match="KV pool"):
            engine.submit(GenerationRequest(prompt_token_ids=[5] * 60, max_new_tokens=10), print)
    finally:
        engine.stop()
