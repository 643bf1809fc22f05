"""What a streaming client sees of each request, and the latency figures taken from it.

A run is measured on the client side, the same way whatever serves it (the
gRPC server, the HTTP frontend or the in-process engine): a `StreamFn` turns
one workload item into the token counts of its events as they arrive, and
`take_trace` stamps each with `time.perf_counter()`; a `StreamFn` over a
wire checks how its stream ended with `check_ending`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .run_result import BenchmarkError, check_count
from .workload import WorkItem, Workload

# Streams one item: yields the number of token ids of each token event, in
# order, and ends after the terminal event. Raises BenchmarkError if the
# request ends other than by its budget (or without a terminal event).
StreamFn = Callable[[WorkItem], AsyncIterator[int]]

# Told the token count of each chunk as it arrives (progress reporting).
TokenSink = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Ending:
    """How a streamed request ended, as its terminal event (and usage) said."""

    reason: str  # the wire's name for it ("FINISH_REASON_LENGTH", "length")
    by_budget: bool  # the reason means "max new tokens reached"
    generated: int | None  # tokens the server says it generated; None: it did not say
    message: str = ""  # the error it carried, if any


def check_ending(item: WorkItem, ending: Ending | None) -> None:
    """The request must have ended by its budget, with exactly that many tokens generated.

    The check every `StreamFn` over a wire makes at the end of a stream;
    `ending` is None when the stream ended without a terminal event. Raises
    BenchmarkError naming the request otherwise.
    """
    if ending is None:
        raise BenchmarkError(f"{item.id}: the stream ended without a finish")
    if not ending.by_budget:
        detail = f" ({ending.message})" if ending.message else ""
        raise BenchmarkError(f"{item.id}: ended with {ending.reason}{detail}")
    if ending.generated != item.max_new_tokens:
        said = "no count" if ending.generated is None else f"{ending.generated} tokens generated"
        raise BenchmarkError(f"{item.id}: usage says {said}, expected {item.max_new_tokens}")


@dataclass(frozen=True, slots=True)
class Trace:
    """One request as its client saw it (perf_counter seconds)."""

    index: int  # position in the workload
    sent: float  # just before the request was sent
    chunks: tuple[tuple[float, int], ...]  # (arrival, token count) of each event with tokens
    done: float  # the stream ended (terminal event received)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft_s(self) -> float | None:
        """Send to the first event carrying tokens; None if none did."""
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def gaps_s(self) -> list[float]:
        """Inter-token latencies: one gap per event after the first, whatever its token count."""
        times = [t for t, _ in self.chunks]
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def e2e_s(self) -> float:
        return self.done - self.sent

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None below two tokens."""
        if self.tokens < 2:
            return None
        return (self.chunks[-1][0] - self.chunks[0][0]) / (self.tokens - 1)


async def take_trace(
    index: int, item: WorkItem, stream: StreamFn, on_tokens: TokenSink | None = None
) -> Trace:
    """Send `item` through `stream` now and time every chunk until the stream ends."""
    chunks: list[tuple[float, int]] = []
    sent = time.perf_counter()
    async for count in stream(item):
        if count:
            chunks.append((time.perf_counter(), count))
            if on_tokens is not None:
                on_tokens(count)
    return Trace(index, sent, tuple(chunks), time.perf_counter())


def check_traces(run: str, traces: Sequence[Trace], workload: Workload) -> int:
    """Every request answered once with exactly its budget; return the tokens received in all."""
    check_count(f"{run}: requests answered", len(traces), len(workload.items))
    check_count(f"{run}: distinct requests", len({t.index for t in traces}), len(workload.items))
    for t in traces:
        item = workload.items[t.index]
        check_count(f"{run}: tokens of {item.id}", t.tokens, item.max_new_tokens)
    produced = sum(t.tokens for t in traces)
    check_count(f"{run}: tokens received", produced, workload.useful_tokens)
    return produced


def summarize_traces(traces: Sequence[Trace]) -> dict[str, Any]:
    """p50/p99 of TTFT, inter-token latency (every gap pooled), TPOT and e2e, in seconds."""
    if not traces:
        raise BenchmarkError("no traces to summarize")
    ttft = [t.ttft_s for t in traces]
    tpot = [t.tpot_s for t in traces]
    return {
        "ttft_s": percentiles([x for x in ttft if x is not None]),
        "itl_s": percentiles([g for t in traces for g in t.gaps_s]),
        "tpot_s": percentiles([x for x in tpot if x is not None]),
        "e2e_s": percentiles([t.e2e_s for t in traces]),
        "token_events": sum(len(t.chunks) for t in traces),
        "multi_token_events": sum(1 for t in traces for _, n in t.chunks if n > 1),
    }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (linear interpolation), rounded to 0.1 ms; {} for no values."""
    if not values:
        return {}
    p50, p99 = np.percentile(np.asarray(values, dtype=float), [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4)}
