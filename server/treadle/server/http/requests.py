"""The engine requests of one HTTP request (one per prompt), read as one stream of events.

Closing it (`aclose`, also when the reader is cancelled because its client left) cancels
every engine request that has not finished; the engine frees their rows on its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...scheduler.engine import Engine
from ...scheduler.event_stream import EventStream
from ...scheduler.events import Event
from ...scheduler.generation_request import GenerationRequest

Tagged = tuple[int, Event]  # (prompt index, event)


class EngineCall:
    """Events of the engine requests of one HTTP request, each tagged with its prompt."""

    def __init__(self, streams: list[EventStream]) -> None:
        self.streams = streams

    @classmethod
    async def open(
        cls, engine: Engine, gens: list[GenerationRequest], max_backlog: int
    ) -> EngineCall:
        """Queue every request (validated and tokenized off the event loop); if one is
        refused, those already queued are cancelled and its error is raised."""
        streams: list[EventStream] = []
        try:
            for gen in gens:
                streams.append(await engine.open_stream(gen, max_backlog=max_backlog))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return cls(streams)

    async def events(self) -> AsyncIterator[Tagged]:
        """Every event until the last finish of every request, in arrival order per request."""
        if len(self.streams) == 1:
            async for event in self.streams[0]:
                yield 0, event
            return
        queue: asyncio.Queue[Tagged | None] = asyncio.Queue()

        async def pump(index: int, stream: EventStream) -> None:
            async for event in stream:
                queue.put_nowait((index, event))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        done = asyncio.gather(*pumps)
        done.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            await done  # re-raise what ended a pump, if anything
        finally:  # left early: the pumps stop (the streams are cancelled by `aclose`)
            for task in pumps:
                task.cancel()

    async def aclose(self) -> None:
        """Cancel every request that has not finished (each still gets its finish event)."""
        for stream in self.streams:
            stream.cancel()
