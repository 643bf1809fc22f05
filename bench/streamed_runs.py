"""Runs measured by streaming clients: closed-loop (W1) and Poisson open-loop (W2).

Both take a `StreamFn`, so the same clients drive the gRPC server, the HTTP
frontend and the in-process engine, and the figures of every path are taken
the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .arrivals import observed_rate, poisson_arrivals
from .progress import Progress
from .run_result import RunResult
from .traces import StreamFn, Trace, check_traces, percentiles, summarize_traces, take_trace
from .workload import WorkItem, Workload

T = TypeVar("T")


@dataclass
class TokenTally:
    """Counts tokens as they reach the clients and reports progress (on the event loop)."""

    run: str
    progress: Progress
    total: int  # the workload's useful tokens
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def __call__(self, count: int) -> None:
        self.tokens += count
        self.progress.tokens(self.run, self.tokens, self.total, self.started)


async def run_closed_loop(
    run: str, stream: StreamFn, workload: Workload, clients: int, progress: Progress
) -> RunResult:
    """W1: `clients` clients, each sending the next request in file order when its last one ends.

    The figure is useful tokens over the wall time from the first send to the
    last stream's end. Raises BenchmarkError unless every request streams
    exactly its budget.
    """
    if clients < 1:
        raise ValueError(f"clients must be at least 1, got {clients}")
    pending: Iterator[tuple[int, WorkItem]] = iter(enumerate(workload.items))
    tally = TokenTally(run, progress, workload.useful_tokens)

    async def client() -> list[Trace]:
        return [await take_trace(i, item, stream, tally) for i, item in pending]

    started = tally.started = time.perf_counter()
    per_client = await gather_all([client() for _ in range(clients)])
    wall = time.perf_counter() - started
    traces = [t for traces in per_client for t in traces]
    produced = check_traces(run, traces, workload)
    return RunResult(
        run, len(traces), produced, wall, {"clients": clients, **summarize_traces(traces)}
    )


async def run_open_loop(
    run: str, stream: StreamFn, workload: Workload, rate: float, seed: int, progress: Progress
) -> RunResult:
    """W2: request i is sent at the i-th arrival of a seeded Poisson process, whatever else runs.

    The figure is useful tokens over the wall time from the start of the
    schedule to the last stream's end. The details hold the schedule (target
    and achieved arrival rate, how late sends were) and the client-side
    latencies (`summarize_traces`). Raises BenchmarkError unless every request
    streams exactly its budget.
    """
    arrivals = poisson_arrivals(len(workload.items), rate, seed)
    tally = TokenTally(run, progress, workload.useful_tokens)

    async def send_at(index: int, item: WorkItem, at: float) -> Trace:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        return await take_trace(index, item, stream, tally)

    started = tally.started = time.perf_counter()
    sends = [send_at(i, item, arrivals[i]) for i, item in enumerate(workload.items)]
    traces = await gather_all(sends)
    wall = time.perf_counter() - started
    produced = check_traces(run, traces, workload)
    lags = [t.sent - started - arrivals[t.index] for t in traces]
    details = {
        "seed": seed,
        "target_rate_rps": round(rate, 4),
        "scheduled_rate_rps": round(observed_rate(len(arrivals), arrivals[-1]), 4),
        "achieved_rate_rps": round(
            observed_rate(len(traces), max(t.sent for t in traces) - started), 4
        ),
        "send_lag_s": {**percentiles(lags), "max": round(max(lags), 4)},
        **summarize_traces(traces),
    }
    return RunResult(run, len(traces), produced, wall, details)


async def gather_all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` concurrently; their results in order.

    On the first failure the others are cancelled and that failure is raised
    as itself (not wrapped in an ExceptionGroup).
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from failed
    return [t.result() for t in tasks]
