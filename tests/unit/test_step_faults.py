"""A failure inside the step loop ends only what it touched (issue 8, part D).

Each test runs a real step thread on a tiny random model, injects a fault, and
checks: the affected requests end with one generic ERROR (its error id in the
log with the details), the others finish exactly as without the fault, the
invariants hold after every step, and the engine keeps serving.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from helpers import Collected, reference_greedy
from step_faults import GENERIC_ERROR, CheckedEngine, Fatal, break_part, fail_on_call

from treadle.api.outcome import FinishReason
from treadle.scheduler.errors import EngineUnavailableError
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.step_stats import StepStats
from treadle.worker.loader import LoadedModel


def gen(rid: str, prompt: list[int], new: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt_token_ids=prompt, max_new_tokens=new, request_id=rid, ignore_eos=True, **kw
    )


def prompt(seed: int, n: int = 10) -> list[int]:
    return [(seed * 7919 + i * 104729) % 40000 + 3 for i in range(n)]


def assert_generic_error(got: Collected, caplog: pytest.LogCaptureFixture, detail: str) -> None:
    """One ERROR finish with a generic message; its id and `detail` are in the log."""
    assert got.finish.reason is FinishReason.ERROR
    match = GENERIC_ERROR.match(got.finish.message or "")
    assert match, got.finish.message
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged, "the error id is not in the log"
    assert any(detail in str(r.exc_info[1]) for r in logged if r.exc_info)


def assert_serves(checked: CheckedEngine, tiny: LoadedModel, rid: str = "after") -> None:
    p = prompt(99)
    checked.submit_together([gen(rid, p, 4)])
    after = checked.wait()[rid]
    assert after.finish.reason is FinishReason.LENGTH
    assert after.tokens == reference_greedy(tiny.model, p, 4, None)


@pytest.fixture
def checked(tiny: LoadedModel) -> Any:
    c = CheckedEngine(tiny)
    c.engine.start()
    yield c
    c.engine.stop()
    assert c.violations == []
    assert c.engine.num_in_flight == 0


@pytest.mark.parametrize("part", ["detokenizer", "matcher"])
def test_one_row_failing_in_update_ends_alone_while_another_finishes_in_that_step(
    checked: CheckedEngine, tiny: LoadedModel, caplog: pytest.LogCaptureFixture, part: str
) -> None:
    caplog.set_level(logging.ERROR)
    good, bad, later = prompt(1), prompt(2), prompt(3)
    break_part(checked.engine, "bad", part, on_call=3)  # its third token: good's last one
    checked.submit_together(
        [gen("good", good, 3), gen("bad", bad, 8, stop=["never"]), gen("later", later, 5)]
    )
    got = checked.wait()
    assert_generic_error(got["bad"], caplog, f"{part} exploded")
    assert len(got["bad"].tokens) == 2  # the tokens before the fault were delivered
    assert got["good"].finish.reason is FinishReason.LENGTH
    assert got["good"].tokens == reference_greedy(tiny.model, good, 3, None)
    assert got["later"].tokens == reference_greedy(tiny.model, later, 5, None)
    assert_serves(checked, tiny)


def test_a_failed_worker_step_ends_its_rows_and_forgets_the_prefix_cache(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    checked = CheckedEngine(tiny, max_batch_rows=1, block_size=4)
    engine = checked.engine
    # step 1 prefills "a" and caches its prompt's full blocks; step 2 fails, and the
    # cache is forgotten (the failed step's writes may be partial).
    engine.worker.execute = fail_on_call(  # type: ignore[method-assign]
        engine.worker.execute, {2}, RuntimeError("device lost")
    )
    shared = prompt(4, 12)
    engine.start()
    try:
        checked.submit_together([gen("a", shared, 6), gen("b", [*shared, 5, 6], 6)])
        got = checked.wait()
        assert_generic_error(got["a"], caplog, "device lost")
        assert got["b"].finish.reason is FinishReason.LENGTH
        assert got["b"].finish.usage.cached_prompt_tokens == 0
        assert got["b"].tokens == reference_greedy(tiny.model, [*shared, 5, 6], 6, None)
        assert_serves(checked, tiny)
    finally:
        engine.stop()
    assert checked.violations == []


def test_update_failing_as_a_whole_ends_the_steps_rows_and_the_queue_goes_on(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    checked = CheckedEngine(tiny, max_batch_rows=2)
    scheduler = checked.engine.scheduler
    scheduler.update = fail_on_call(  # type: ignore[method-assign]
        scheduler.update, {2}, ValueError("update broke")
    )
    checked.engine.start()
    try:
        checked.submit_together([gen(r, prompt(i), 5) for i, r in enumerate("abc")])
        got = checked.wait()
        for rid in "ab":
            assert_generic_error(got[rid], caplog, "update broke")
            assert len(got[rid].tokens) == 1
        assert got["c"].tokens == reference_greedy(tiny.model, prompt(2), 5, None)
        assert_serves(checked, tiny)
    finally:
        checked.engine.stop()
    assert checked.violations == []


def test_schedule_failing_unattributably_ends_everything_in_flight_and_goes_on(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    checked = CheckedEngine(tiny, max_batch_rows=2)
    scheduler = checked.engine.scheduler
    scheduler.schedule = fail_on_call(  # type: ignore[method-assign]
        scheduler.schedule, {3}, KeyError("lost track")
    )
    checked.engine.start()
    try:
        checked.submit_together([gen(r, prompt(i), 8) for i, r in enumerate("abc")])
        got = checked.wait()
        for rid in "abc":  # two running, one waiting: all end with one ERROR each
            assert_generic_error(got[rid], caplog, "lost track")
        assert [len(got[r].tokens) for r in "abc"] == [2, 2, 0]
        assert_serves(checked, tiny)
    finally:
        checked.engine.stop()
    assert checked.violations == []


def test_an_admission_failure_ends_only_the_request_being_admitted(
    checked: CheckedEngine, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    bad = prompt(7)
    scheduler = checked.engine.scheduler
    cached_blocks = scheduler._cached_blocks

    def picky_lookup(req: Any) -> list[int]:
        if req.prompt_ids == bad:
            raise RuntimeError("prefix index corrupt")
        return cached_blocks(req)

    scheduler._cached_blocks = picky_lookup  # type: ignore[method-assign]
    checked.submit_together([gen("a", prompt(6), 4), gen("bad", bad, 4), gen("c", prompt(8), 4)])
    got = checked.wait()
    assert_generic_error(got["bad"], caplog, "prefix index corrupt")
    assert got["bad"].tokens == []
    for rid, seed in (("a", 6), ("c", 8)):
        assert got[rid].tokens == reference_greedy(tiny.model, prompt(seed), 4, None)


@pytest.mark.parametrize("fault", ["recovery_raises", "fatal_from_the_worker"])
def test_when_the_step_thread_dies_every_request_ends_once_and_listeners_are_told(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.ERROR)
    checked = CheckedEngine(tiny, max_batch_rows=2)
    engine = checked.engine
    if fault == "recovery_raises":
        engine.scheduler.schedule = fail_on_call(  # type: ignore[method-assign]
            engine.scheduler.schedule, {3}, RuntimeError("schedule broke")
        )
        engine.scheduler.fail_all = fail_on_call(  # type: ignore[method-assign]
            engine.scheduler.fail_all, {1}, RuntimeError("recovery broke")
        )
    else:
        engine.worker.execute = fail_on_call(  # type: ignore[method-assign]
            engine.worker.execute, {3}, Fatal("fatal")
        )
    fatal: list[BaseException] = []
    died = threading.Event()
    engine.on_fatal.append(lambda exc: (fatal.append(exc), died.set()))
    engine.start()
    try:
        checked.submit_together([gen(r, prompt(i), 8) for i, r in enumerate("abc")])
        assert died.wait(60)
        got = checked.wait()
        for rid in "abc":
            assert got[rid].finish.reason is FinishReason.ERROR  # exactly one, and last
            assert GENERIC_ERROR.match(got[rid].finish.message or "")
        assert [len(got[r].tokens) for r in "abc"] == [2, 2, 0]  # produced events delivered
        assert len(fatal) == 1 and type(fatal[0]) is (
            RuntimeError if fault == "recovery_raises" else Fatal
        )
        with pytest.raises(EngineUnavailableError):
            engine.submit(gen("late", prompt(9), 2), lambda events: None)
        assert engine.num_in_flight == 0
    finally:
        engine.stop(timeout=10)
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    assert checked.violations == []


def test_a_fatal_error_between_forgetting_and_delivering_still_delivers_the_finish(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A step's finished requests leave the registry before their events go out; if the
    step thread dies in between (here: a step observer), their events still arrive."""
    caplog.set_level(logging.ERROR)
    checked = CheckedEngine(tiny, max_batch_rows=2)
    engine = checked.engine

    def fatal_on_a_finish(stats: StepStats) -> None:
        if stats.finished:
            raise Fatal("observer died")

    engine.step_observers.append(fatal_on_a_finish)
    died = threading.Event()
    engine.on_fatal.append(lambda exc: died.set())
    engine.start()
    try:
        checked.submit_together([gen("short", prompt(1), 2), gen("long", prompt(2), 8)])
        assert died.wait(60)
        got = checked.wait()
        assert got["short"].finish.reason is FinishReason.LENGTH  # its own, exactly once
        assert got["short"].tokens == reference_greedy(tiny.model, prompt(1), 2, None)
        assert got["long"].finish.reason is FinishReason.ERROR
        assert len(got["long"].tokens) == 2  # the step's token events came first
        assert engine.num_in_flight == 0
    finally:
        engine.stop(timeout=10)
    assert checked.violations == []
