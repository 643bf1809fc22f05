"""Token arrival times of requests streamed from an in-process engine (W3, W4)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from treadle.api.outcome import FinishReason
from treadle.scheduler.engine import Engine
from treadle.scheduler.events import FinishEvent, TokenEvent
from treadle.scheduler.generation_request import GenerationRequest

from .run_result import BenchmarkError


@dataclass
class Timed:
    """When one request was sent, when each of its tokens arrived, and how it ended."""

    sent: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)  # one per token id
    finish: FinishEvent | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive token events (tokens of one event share a time)."""
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times) if b > a]


async def stream_timed(engine: Engine, gen: GenerationRequest, timed: Timed) -> Timed:
    """Stream `gen`, stamping each token as it arrives; raise unless it ends with LENGTH."""
    timed.sent = time.perf_counter()
    async for event in engine.generate(gen):
        if isinstance(event, TokenEvent):
            timed.token_times.extend([time.perf_counter()] * len(event.token_ids))
        else:
            timed.finish = event
    if timed.finish is None or timed.finish.reason is not FinishReason.LENGTH:
        raise BenchmarkError(f"{gen.request_id}: ended with {timed.finish}")
    return timed
