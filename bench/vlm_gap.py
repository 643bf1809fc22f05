"""Image prefill's effect on running text streams: text chats decode on the engine; once
each has streamed some tokens, image requests arrive all at once. Do the streams stall?"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel

from .progress import Progress
from .stream_clock import Timed, stream_timed
from .traces import percentiles


@dataclass(frozen=True, slots=True)
class GapScenario:
    """The shape of the scenario."""

    streams: list[GenerationRequest]  # the text chats, decoding first
    images: list[GenerationRequest]  # the image requests that arrive later, all at once
    warm_tokens: int  # tokens each stream has received before the images arrive


def run_image_arrivals(
    loaded: LoadedModel, config: EngineConfig, scenario: GapScenario, progress: Progress
) -> dict[str, Any]:
    """Run `scenario` on a fresh engine; the streams' inter-token gaps (p50, p99, max, in
    seconds) before the images arrived and while they were prefilled (from their arrival to
    the last image's first token), and the image requests' time to first token.

    Raises BenchmarkError if a request ends other than by its budget.
    """
    engine = Engine(loaded, config)
    engine.start()
    try:
        progress.say(f"image arrivals: {len(scenario.streams)} text streams start")
        figures = asyncio.run(_scenario(engine, scenario))
    finally:
        engine.stop()
    progress.say(
        f"image arrivals: {len(scenario.images)} images' TTFT p50 "
        f"{figures['image_ttft_s'].get('p50')} s; text gap p50 before "
        f"{figures['text_gap_before_s'].get('p50')} s, max during "
        f"{figures['text_gap_during_s'].get('max')} s"
    )
    return figures


async def _scenario(engine: Engine, scenario: GapScenario) -> dict[str, Any]:
    clocks = [Timed() for _ in scenario.streams]
    texts = [
        asyncio.create_task(stream_timed(engine, gen, clock))
        for gen, clock in zip(scenario.streams, clocks, strict=True)
    ]
    started = time.perf_counter()
    # the workload's shape, not synchronisation: wait until every stream is decoding
    while any(len(c.token_times) < scenario.warm_tokens for c in clocks):
        if any(t.done() for t in texts):  # a stream ended early or failed: gather says why
            break
        await asyncio.sleep(0.005)
    arrived = time.perf_counter()
    images = await asyncio.gather(*(stream_timed(engine, g, Timed()) for g in scenario.images))
    done = await asyncio.gather(*texts)
    prefilled = max(i.token_times[0] for i in images)  # the last image's first token
    before = [b - a for c in done for a, b in _pairs(c) if b <= arrived]
    during = [b - a for c in done for a, b in _pairs(c) if b > arrived and a < prefilled]
    return {
        "images_arrived_after_s": round(arrived - started, 4),
        "image_prefill_window_s": round(prefilled - arrived, 4),
        "image_ttft_s": gap_stats([i.ttft for i in images]),
        "text_gap_before_s": gap_stats(before),
        "text_gap_during_s": gap_stats(during),
        # streams still decoding when the last image's first token came (all, if the
        # streams' budget outlasts the image prefills)
        "streams_through_window": sum(1 for c in done if c.token_times[-1] >= prefilled),
    }


def gap_stats(values: list[float]) -> dict[str, float]:
    """p50, p99 and max, rounded to 0.1 ms; {} for no values."""
    if not values:
        return {}
    return {**percentiles(values), "max": round(max(values), 4)}


def _pairs(clock: Timed) -> list[tuple[float, float]]:
    """Consecutive token times of a stream, one pair per gap (tokens of one event share a
    time and make no gap)."""
    return [(a, b) for a, b in itertools.pairwise(clock.token_times) if b > a]
