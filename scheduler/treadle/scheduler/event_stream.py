"""Delivery of a request's events from the step thread to an asyncio consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .events import CANCELLED, SLOW_READER, Ending, Event, FinishEvent

DEFAULT_BACKLOG = 1024  # undelivered steps of events before the request is cut


class EventStream:
    """The async iterator of one request's events.

    The step thread calls `deliver` once per step with that step's events; they
    cross to the consumer's event loop through `call_soon_threadsafe`. Iteration
    ends after the last terminal `FinishEvent` (one per sample, `samples` in
    all). `cancel()` (or leaving the iteration early through `aclose`) aborts
    the request on the engine.

    Memory is bounded: once more than `max_backlog` deliveries wait unread (the
    consumer, e.g. a slow gRPC client, is not keeping up), the request is `cut`:
    aborted with `SLOW_READER` (RESOURCE_EXHAUSTED). From then on its token
    events are dropped, buffered or not, and its finish event is the next one.
    """

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        abort: Callable[[str, Ending], None],
        max_backlog: int = DEFAULT_BACKLOG,
        samples: int = 1,
    ) -> None:
        self.request_id = request_id
        self.samples = samples  # finish events to expect
        self.max_backlog = max_backlog
        self._loop = loop
        self._abort = abort
        self._queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._pending: list[Event] = []
        self._finishes = 0  # finish events handed to the consumer
        self._cut = False  # aborted as a slow reader: only the finish is still queued

    def deliver(self, events: list[Event]) -> None:
        """Called from the step thread; never blocks, never raises."""
        try:
            self._loop.call_soon_threadsafe(self._put, events)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self._abort(self.request_id, CANCELLED)

    @property
    def _finished(self) -> bool:
        return self._finishes >= self.samples

    def _put(self, events: list[Event]) -> None:
        if self._cut:  # after the cut, keep only the terminal event
            events = [e for e in events if isinstance(e, FinishEvent)]
            if not events:
                return
        self._queue.put_nowait(events)
        if self._queue.qsize() > self.max_backlog:
            self.cut()

    def cut(self) -> None:
        """End the request because its reader is too slow (SLOW_READER): its token
        events are dropped from now on and its finish event comes next."""
        if not self._cut and not self._finished:
            self._cut = True
            self._abort(self.request_id, SLOW_READER)

    @property
    def is_cut(self) -> bool:
        """Whether the request was cut as a slow reader (its finish says SLOW_READER)."""
        return self._cut

    @property
    def backlog(self) -> int:
        """Deliveries waiting to be read."""
        return self._queue.qsize()

    def cancel(self) -> None:
        """Abort the request; its terminal event (cancelled) still arrives."""
        if not self._finished:
            self._abort(self.request_id, CANCELLED)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._finished:
            if not self._pending:
                self._pending = await self._queue.get()
            event = self._pending.pop(0)
            if isinstance(event, FinishEvent):
                self._finishes += 1
                return event
            if not self._cut:
                return event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop listening; aborts the request if it has not finished."""
        self.cancel()
