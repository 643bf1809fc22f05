"""treadle in-process: W1's closed-loop clients with step statistics; W2's open-loop clients.

W1 here is the reference run (`run_treadle`). W2 in-process goes through the
same streaming clients as the gRPC path (`streamed_runs`), with the engine as
the stream (`engine_stream`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.events import FinishEvent, TokenEvent
from treadle.scheduler.generation_request import GenerationRequest
from treadle.scheduler.step_stats import StepStats
from treadle.worker.loader import LoadedModel

from .progress import Progress
from .run_result import BenchmarkError, RunResult, check_count
from .streamed_runs import run_open_loop
from .traces import StreamFn, percentiles
from .workload import WorkItem, Workload


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one closed-loop client saw of one request."""

    index: int  # position in the workload
    tokens: int  # token ids received in TokenEvents
    finish: FinishEvent


@dataclass
class StepLog:
    """A step observer: keeps every StepStats and reports progress (runs on the step thread)."""

    progress: Progress
    total_tokens: int
    started: float = field(default_factory=time.perf_counter)
    steps: list[StepStats] = field(default_factory=list)
    tokens: int = 0

    def __call__(self, stats: StepStats) -> None:
        self.steps.append(stats)
        self.tokens += stats.generated_tokens
        self.progress.tokens("treadle", self.tokens, self.total_tokens, self.started)


def run_treadle(
    loaded: LoadedModel,
    workload: Workload,
    config: EngineConfig,
    progress: Progress,
    clients: int = 64,
    warmup: bool = True,
) -> RunResult:
    """Serve `workload` with `clients` closed-loop asyncio clients; useful tokens over wall time.

    Each client sends the next request in file order as soon as its previous
    one ends. Raises BenchmarkError if the engine's prompt ids differ from
    the workload's, or a request ends other than by its budget.
    """
    engine = Engine(loaded, config)
    check_prompt_ids(engine, workload)
    log = StepLog(progress, workload.useful_tokens)
    engine.start()
    try:
        if warmup:
            asyncio.run(_one(engine, 0, _warmup_request(workload.items[0])))
        engine.step_observers.append(log)
        log.started = time.perf_counter()
        outcomes, wall = asyncio.run(_closed_loop(engine, workload, clients))
    finally:
        engine.stop()
    produced = check_outcomes(outcomes, workload)
    details = {
        "clients": clients,
        **summarize_steps(log.steps),
        **summarize_latency([o.finish for o in outcomes]),
    }
    return RunResult("treadle", len(outcomes), produced, wall, details)


def run_treadle_open_loop(
    loaded: LoadedModel,
    workload: Workload,
    config: EngineConfig,
    progress: Progress,
    rate: float,
    seed: int,
    warmup: bool = True,
) -> RunResult:
    """W2 in-process: `run_open_loop` on a fresh engine ("w2_inprocess").

    Raises BenchmarkError as `run_open_loop` does.
    """
    engine = Engine(loaded, config)
    check_prompt_ids(engine, workload)
    engine.start()
    try:
        if warmup:
            asyncio.run(_one(engine, 0, _warmup_request(workload.items[0])))
        stream = engine_stream(engine)
        return asyncio.run(run_open_loop("w2_inprocess", stream, workload, rate, seed, progress))
    finally:
        engine.stop()


def engine_stream(engine: Engine) -> StreamFn:
    """A StreamFn over `Engine.generate`: yields the token count of each TokenEvent.

    Raises BenchmarkError if the request ends other than by length.
    """

    async def stream(item: WorkItem) -> AsyncIterator[int]:
        async for event in engine.generate(item.generation_request()):
            if isinstance(event, TokenEvent):
                yield len(event.token_ids)
            elif event.reason is not FinishReason.LENGTH:
                raise BenchmarkError(
                    f"{item.id}: ended with {event.reason.value} ({event.message})"
                )

    return stream


def check_prompt_ids(engine: Engine, workload: Workload) -> None:
    """The engine must see the same prompt ids the peers are given."""
    for item, prompt in zip(workload.items, workload.prompts, strict=True):
        if engine.inputs.prompt_ids(item.generation_request()) != list(prompt):
            raise BenchmarkError(
                f"request {item.id}: the engine's prompt ids differ from the peers'"
            )


def check_outcomes(outcomes: list[Outcome], workload: Workload) -> int:
    """Every request answered once, by its budget; return the tokens received in all."""
    check_count("treadle: requests answered", len(outcomes), len(workload.items))
    for o in outcomes:
        item = workload.items[o.index]
        if o.finish.reason is not FinishReason.LENGTH:
            raise BenchmarkError(
                f"treadle: request {item.id} ended with {o.finish.reason.value}"
                f" ({o.finish.message})"
            )
        check_count(f"treadle: tokens of {item.id}", o.tokens, item.max_new_tokens)
    produced = sum(o.tokens for o in outcomes)
    check_count("treadle: tokens received", produced, workload.useful_tokens)
    return produced


def summarize_steps(steps: list[StepStats]) -> dict[str, Any]:
    """Step count, mean decode batch, and the share of step time outside the model forward."""
    step_s = sum(s.step_seconds for s in steps)
    decode = [s.decode_rows for s in steps if s.decode_rows > 0]
    return {
        "steps": len(steps),
        "decode_steps": len(decode),
        "prefill_steps": sum(1 for s in steps if s.prefill_rows > 0),
        "mean_decode_batch": round(sum(decode) / len(decode), 2) if decode else 0.0,
        "mean_step_ms": round(1000 * step_s / len(steps), 3) if steps else 0.0,
        "step_s": round(step_s, 4),
        "forward_seconds": round(sum(s.forward_seconds for s in steps), 4),
        "process_seconds": round(sum(s.process_seconds for s in steps), 4),
        # the goal's "scheduler share": everything in a step but the model forward
        "scheduler_share": (
            sum(s.outside_forward_seconds for s in steps) / step_s if step_s else 0.0
        ),
    }


def summarize_latency(finishes: list[FinishEvent]) -> dict[str, Any]:
    """p50/p99 of time to first token, end-to-end latency and queue time (seconds)."""
    ttft = [f.usage.time_to_first_token_seconds for f in finishes]
    figures = {
        "ttft_s": [t for t in ttft if t is not None],
        "e2e_s": [f.usage.total_seconds for f in finishes],
        "queue_s": [f.usage.queue_seconds for f in finishes],
    }
    return {name: percentiles(values) for name, values in figures.items()}


def _warmup_request(item: WorkItem) -> GenerationRequest:
    gen = item.generation_request()
    gen.max_new_tokens = 2
    gen.request_id = f"warmup-{item.id}"
    return gen


async def _closed_loop(
    engine: Engine, workload: Workload, clients: int
) -> tuple[list[Outcome], float]:
    """Run `clients` clients over one shared iterator of the workload; return outcomes and wall."""
    queue: Iterator[tuple[int, WorkItem]] = iter(enumerate(workload.items))
    outcomes: list[Outcome] = []

    async def client() -> None:
        for index, item in queue:
            outcomes.append(await _one(engine, index, item.generation_request()))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - started


async def _one(engine: Engine, index: int, gen: GenerationRequest) -> Outcome:
    tokens = 0
    finish: FinishEvent | None = None
    async for event in engine.generate(gen):
        if isinstance(event, TokenEvent):
            tokens += len(event.token_ids)
        else:
            finish = event
    if finish is None:
        raise BenchmarkError(f"request {gen.request_id}: no terminal event")
    return Outcome(index, tokens, finish)
