"""Delivery of a request's events from the step thread to an asyncio consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .events import Event, FinishEvent


class EventStream:
    """The async iterator of one request's events.

    The step thread calls `deliver` once per step with that step's events; they
    cross to the consumer's event loop through `call_soon_threadsafe`. Iteration
    ends after the terminal `FinishEvent`. `cancel()` (or leaving the
    iteration early through `aclose`) aborts the request on the engine.
    """

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]
    ) -> None:
        self.request_id = request_id
        self._loop = loop
        self._abort = abort
        self._queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._pending: list[Event] = []
        self._finished = False

    def deliver(self, events: list[Event]) -> None:
        """Called from the step thread; never blocks, never raises."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, events)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self._abort(self.request_id)

    def cancel(self) -> None:
        """Abort the request; its terminal event (cancelled) still arrives."""
        if not self._finished:
            self._abort(self.request_id)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        if not self._pending:
            self._pending = await self._queue.get()
        event = self._pending.pop(0)
        if isinstance(event, FinishEvent):
            self._finished = True
        return event

    async def aclose(self) -> None:
        """Stop listening; aborts the request if it has not finished."""
        self.cancel()
