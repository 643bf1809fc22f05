"""A multiplexed bidirectional Session: many requests on one stream, each cancellable."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from treadle.v1 import treadle_pb2 as pb

from ..api.params import GenerationParams
from .convert import Prompt, event_from_proto
from .errors import Cancelled, InternalError, InvalidArgument, TreadleClientError, error_from_rpc
from .results import Event, Finish, Result, SampleCollector
from .streams import raise_if_failed

# (prompt, token_ids, params, request_id, overrides) -> a checked wire request
BuildRequest = Callable[
    [Prompt | None, Sequence[int] | None, GenerationParams | None, str, dict[str, Any]],
    pb.GenerateRequest,
]

log = logging.getLogger("treadle.client")


class SessionRequest:
    """One request of a session: an async iterator of its events, `cancel()`, `result()`.

    It always ends: with its Finish (of every sample, `samples` in all), or
    with the error that tore the session down (the server's status, Cancelled
    for a session cancelled locally, InternalError if the stream ended without
    this request's Finish).
    """

    def __init__(self, session: AsyncSession, request_id: str, samples: int = 1) -> None:
        self.request_id = request_id
        self.samples = samples
        self._session = session
        self._queue: asyncio.Queue[Event | TreadleClientError] = asyncio.Queue()
        self._events = SampleCollector(samples)  # every event iterated, for result()
        self._delivered = 0  # finishes put in the queue
        self._error: TreadleClientError | None = None

    @property
    def done(self) -> bool:
        return self._events.done or self._error is not None

    def __aiter__(self) -> SessionRequest:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, TreadleClientError):
            self._error = item
            raise item
        self._events.add(item)
        return item

    def cancel(self) -> None:
        """Ask the server to end this request; its Finish (cancelled) still arrives."""
        if not self.done:
            self._session._send(pb.SessionRequest(cancel=pb.Cancel(request_id=self.request_id)))

    async def result(self) -> Result:
        """The whole request (events not yet iterated are consumed); may be called again.

        Raises its error (every time) if it failed, was cut by server
        shutdown (Unavailable) or its session was torn down.
        """
        async for _ in self:
            pass
        if self._error is not None:
            raise self._error
        result = self._events.result()  # done: every sample has finished
        raise_if_failed(result)
        return result

    async def aclose(self) -> None:
        """Stop listening; cancels the request if it has not finished."""
        self.cancel()

    def _put(self, item: Event | TreadleClientError) -> bool:
        """Queue `item`; returns whether it ends the request (the last sample's Finish)."""
        self._queue.put_nowait(item)
        if not isinstance(item, Finish):
            return False
        self._delivered += 1
        return self._delivered >= self.samples


class AsyncSession:
    """`async with client.session() as s:` then `r = s.submit(...)` as often as needed.

    Leaving the block half-closes the stream and waits until every request
    has finished; leaving it by an exception cancels the whole session. When
    the session ends for any reason, every open request ends with an error.
    """

    def __init__(
        self,
        stub: Any,
        build: BuildRequest,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        self._stub = stub
        self._build = build
        self._metadata = metadata
        self._timeout = timeout
        self._outgoing: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
        self._open: dict[str, SessionRequest] = {}
        self._ids = itertools.count(1)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._ended: TreadleClientError | None = None  # what ended the session, once it has

    async def __aenter__(self) -> AsyncSession:
        self._call = self._stub.Session(
            self._requests(), metadata=self._metadata, timeout=self._timeout
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._reader is not None
        if exc_type is not None:
            self._call.cancel()
        self._outgoing.put_nowait(None)  # half-close
        await asyncio.gather(self._reader, return_exceptions=exc_type is not None)

    def submit(
        self,
        prompt: Prompt | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        params: GenerationParams | None = None,
        request_id: str = "",
        **overrides: Any,
    ) -> SessionRequest:
        """Start a request on the session, like `AsyncClient.stream`; returns its handle.

        Raises InvalidArgument (client-side checks, or a `request_id` still
        open in this session) before anything is sent, and the session's
        error once it has ended.
        """
        if self._ended is not None:
            raise self._ended
        request = self._build(prompt, token_ids, params, request_id, overrides)
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        if request.request_id in self._open:
            raise InvalidArgument(
                f"request_id: {request.request_id!r} is already open in this session",
                field="request_id",
            )
        handle = SessionRequest(self, request.request_id, request.n or 1)
        self._open[request.request_id] = handle
        self._send(pb.SessionRequest(generate=request))
        return handle

    def _send(self, message: pb.SessionRequest) -> None:
        self._outgoing.put_nowait(message)

    async def _requests(self) -> AsyncIterator[pb.SessionRequest]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        ended: TreadleClientError = InternalError(
            "the session ended before the request finished", grpc.StatusCode.INTERNAL
        )
        try:
            async for message in self._call:
                self._deliver(message)
        except grpc.RpcError as exc:
            ended = error_from_rpc(exc)
            raise ended from None
        except asyncio.CancelledError:
            ended = Cancelled("the session was cancelled", grpc.StatusCode.CANCELLED)
            self._call.cancel()
            raise
        finally:
            self._end_all(ended)

    def _deliver(self, message: pb.SessionEvent) -> None:
        kind = message.WhichOneof("event")
        if kind not in ("token", "finish"):  # e.g. `rejected`: an item this SDK never sends
            log.warning("session: ignored %s event for %r", kind, message.request_id)
            return
        handle = self._open.get(message.request_id)
        if handle is None:
            return
        if handle._put(event_from_proto(message)):  # its last finish: the id may be reused
            del self._open[message.request_id]

    def _end_all(self, error: TreadleClientError) -> None:
        """End every open request with `error`; later submits raise it."""
        self._ended = error
        for handle in self._open.values():
            handle._put(error)
        self._open.clear()
