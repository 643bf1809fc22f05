"""The async stream of one request's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from treadle.v1 import treadle_pb2 as pb

from ..api.outcome import FinishReason
from .convert import event_from_proto
from .errors import TreadleClientError, Unavailable, error_for, error_from_number, error_from_rpc
from .results import Event, Finish, Result, SampleCollector, TokenChunk

OpenCall = Callable[[], Any]  # () -> a grpc.aio UnaryStreamCall of GenerateEvents


class ResponseStream:
    """Async iterator over one request's events: TokenChunks, then one Finish.

    A request for `samples` (n) samples interleaves theirs (`index` says whose)
    and each sample ends with its own Finish; the iteration ends after the n-th.

    Leaving the iteration early (`aclose()`, `cancel()`, `async with` exit,
    the consuming task being cancelled) cancels the request on the server.
    gRPC retries a refused call (per the client's RetryPolicy) until its
    first event arrives, never after. The events are what the server sent:
    a request cut by server shutdown ends with a cancelled Finish whose
    `error_code` is UNAVAILABLE; `text()` and `result()` raise Unavailable
    for it.
    """

    def __init__(self, open_call: OpenCall, samples: int = 1) -> None:
        self._open_call = open_call
        self.samples = samples
        self._finishes = 0  # finishes received
        self._call: Any = None
        self._done = False

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            message = await self._next_message()
        except asyncio.CancelledError:
            self.cancel()
            raise
        event = event_from_proto(message)
        if isinstance(event, Finish):
            self._finishes += 1
            self._done = self._finishes >= self.samples
        return event

    def cancel(self) -> None:
        """Cancel the request (no-op once it has finished)."""
        self._done = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        if not self._done:
            self.cancel()

    async def text(self) -> AsyncIterator[str]:
        """Only the text (of sample 0, when n > 1), as it is released; raises if a
        sample ends with an error."""
        async for event in self:
            if isinstance(event, TokenChunk):
                if event.text and event.index == 0:
                    yield event.text
            else:
                raise_if_error(event)

    async def result(self) -> Result:
        """Consume the stream into one Result (every sample's)."""
        return await collect(self, self.samples)

    async def _next_message(self) -> pb.GenerateEvent:
        if self._call is None:  # kept at once, so `cancel()` reaches it
            self._call = self._open_call()
        return await _read(self._call)


async def _read(call: Any) -> pb.GenerateEvent:
    """The next event; a failed call raises its typed error."""
    try:
        message = await call.read()
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
    if message is grpc.aio.EOF:
        raise _no_finish()
    return message


UNAVAILABLE_NUMBER = grpc.StatusCode.UNAVAILABLE.value[0]


def finish_error(finish: Finish) -> TreadleClientError | None:
    """The error a Finish reports: a failed request, or one cut by server shutdown.

    A request the server cancelled because it is shutting down (reason
    cancelled, code UNAVAILABLE) is not a result: it is Unavailable, which
    may be retried (on another replica). A cancellation the client asked for
    is a normal end.
    """
    if finish.reason is FinishReason.ERROR:
        return error_from_number(finish.error_code, finish.error_message)
    if finish.reason is FinishReason.CANCELLED and finish.error_code == UNAVAILABLE_NUMBER:
        message = finish.error_message or "server shutting down"
        return Unavailable(
            f"{message}: the request was cut after {finish.usage.generated_tokens} tokens",
            grpc.StatusCode.UNAVAILABLE,
        )
    return None


def raise_if_error(finish: Finish) -> None:
    """Raise `finish_error(finish)`, if any."""
    if (error := finish_error(finish)) is not None:
        raise error


def raise_if_failed(result: Result) -> None:
    """Raise the error of the first sample (in index order) whose Finish reports one."""
    for finish in [s.finish for s in result.samples] or [result.finish]:
        raise_if_error(finish)


async def collect(events: AsyncIterator[Event] | Awaitable[Any], samples: int = 1) -> Result:
    """Gather a stream of events of `samples` samples into one Result, once every sample
    has finished (raises on an ERROR finish, or if the stream ends before)."""
    collector = SampleCollector(samples)
    async for event in events:  # type: ignore[union-attr]
        collector.add(event)
        if collector.done:
            break
    if not collector.done:
        raise _no_finish()
    result = collector.result()
    raise_if_failed(result)
    return result


def _no_finish() -> TreadleClientError:
    return error_for(grpc.StatusCode.INTERNAL, "the stream ended without a finish event")
