"""Fault injection for the engine's step loop: checked engines, faulty parts, fatal errors."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from helpers import Collected

from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.request import Request
from treadle.scheduler.step_stats import StepStats
from treadle.worker.loader import LoadedModel

GENERIC_ERROR = re.compile(r"^internal error \(error id ([0-9a-f]{8})\); see the server log$")


class Fatal(BaseException):
    """An error no recovery may catch (it escapes `except Exception`)."""


class CheckedEngine:
    """An engine on a tiny model whose invariants are checked after every step.

    Violations are recorded (an observer must not raise into the step loop)
    and `violations` is asserted empty by the tests.
    """

    def __init__(self, tiny: LoadedModel, **config: Any) -> None:
        settings = {"max_batch_rows": 4, "max_seq_len": 128, "step_token_budget": 64, **config}
        self.engine = Engine(tiny, EngineConfig(**settings))
        self.violations: list[str] = []
        self.steps = 0
        self.engine.step_observers.append(self._check)
        self.got: dict[str, Collected] = {}

    def _check(self, stats: StepStats) -> None:
        self.steps += 1
        try:
            self.engine.check_invariants()
        except AssertionError as exc:
            self.violations.append(f"step {stats.step}: {exc}")

    def submit_together(self, gens: Iterable[GenerationRequest]) -> None:
        """Submit `gens` so that the step thread sees them all in one inbox drain.

        The step thread is held while queueing the first one until all are submitted.
        """
        gens = list(gens)
        submitted = threading.Event()
        scheduler = self.engine.scheduler
        original = scheduler.add
        first = [True]

        def add(req: Request) -> None:
            if first and first.pop():
                assert submitted.wait(30), "the test did not submit in time"
            original(req)

        scheduler.add = add  # type: ignore[method-assign]
        try:
            for gen in gens:
                assert gen.request_id is not None
                sink = self.got.setdefault(gen.request_id, Collected()).events.extend
                self.engine.submit(gen, sink)
        finally:
            submitted.set()

    def wait(self) -> dict[str, Collected]:
        """Wait (bounded) until nothing is in flight; every request's events by id."""
        assert self.engine.wait_until_idle(60), "requests still in flight"
        return self.got


def fail_on_call(
    target: Callable[..., Any], calls: set[int], error: BaseException
) -> Callable[..., Any]:
    """`target`, raising `error` instead on the given (1-based) calls."""
    count = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] in calls:
            raise error
        return target(*args, **kwargs)

    return wrapped


def break_part(engine: Engine, request_id: str, part: str, on_call: int) -> None:
    """Make `part` ("detokenizer" or "matcher") of request `request_id` raise on its nth use."""
    build = engine.factory.build

    def faulty_build(gen: GenerationRequest, rid: str, sink: Any) -> Request:
        req = build(gen, rid, sink)
        if rid == request_id:
            if part == "detokenizer":
                req.detokenizer.step = fail_on_call(  # type: ignore[method-assign]
                    req.detokenizer.step, {on_call}, RuntimeError("detokenizer exploded")
                )
            else:
                req.matcher.feed = fail_on_call(  # type: ignore[method-assign]
                    req.matcher.feed, {on_call}, RuntimeError("matcher exploded")
                )
        return req

    engine.factory.build = faulty_build  # type: ignore[method-assign]
