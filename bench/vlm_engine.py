"""treadle in-process on image requests: every request submitted at once, with the engine's
step and latency summaries."""

from __future__ import annotations

import asyncio
import time

from treadle.scheduler.engine import Engine, EngineConfig
from treadle.worker.loader import LoadedModel

from .progress import Progress
from .run_result import BenchmarkError, RunResult, check_count
from .stream_clock import Timed, stream_timed
from .treadle_run import StepLog, summarize_latency, summarize_steps
from .vlm_requests import ImageQuestion, processor_prompt_ids


def run_treadle_images(
    loaded: LoadedModel,
    items: list[ImageQuestion],
    config: EngineConfig,
    max_new_tokens: int,
    progress: Progress,
    warmup: ImageQuestion | None = None,
) -> RunResult:
    """Submit every request of `items` at once to a fresh engine; tokens over wall time
    (first submission to last token).

    `warmup`: a request (a picture none of `items` has, so the prefix cache gains nothing)
    run alone for 2 tokens before the clock starts. Raises BenchmarkError if the engine's
    prompt ids differ from the peers', or a request ends other than by its budget.
    """
    engine = Engine(loaded, config)
    check_image_prompt_ids(engine, loaded.processor, items)
    total = len(items) * max_new_tokens
    log = StepLog(progress, total)
    engine.start()
    try:
        if warmup is not None:
            asyncio.run(stream_timed(engine, warmup.generation_request(2), Timed()))
        engine.step_observers.append(log)
        log.started = time.perf_counter()
        done = asyncio.run(_all_at_once(engine, items, max_new_tokens))
        wall = time.perf_counter() - log.started
    finally:
        engine.stop()
    for item, timed in zip(items, done, strict=True):
        check_count(f"treadle: tokens of {item.id}", len(timed.token_times), max_new_tokens)
    produced = sum(len(t.token_times) for t in done)
    check_count("treadle: tokens received", produced, total)
    details = {
        "prompt_tokens": sum(t.finish.usage.prompt_tokens for t in done if t.finish),
        **summarize_steps(log.steps),
        **summarize_latency([t.finish for t in done if t.finish]),
    }
    return RunResult("treadle", len(done), produced, wall, details)


def check_image_prompt_ids(engine: Engine, processor: object, items: list[ImageQuestion]) -> None:
    """The engine must see, for each request, the prompt ids `generate` is given."""
    for item in items:
        gen = item.generation_request(1)
        if engine.factory.prompt_ids(gen) != processor_prompt_ids(processor, item):
            raise BenchmarkError(
                f"request {item.id}: the engine's prompt ids differ from the peers'"
            )


async def _all_at_once(
    engine: Engine, items: list[ImageQuestion], max_new_tokens: int
) -> list[Timed]:
    """Stream every request concurrently; each ends by its budget (else BenchmarkError)."""
    return list(
        await asyncio.gather(
            *(stream_timed(engine, i.generation_request(max_new_tokens), Timed()) for i in items)
        )
    )
