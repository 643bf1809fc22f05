"""What is still open (a gRPC call, an HTTP request), for the drain to wait on."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class OpenSet:
    """Keys added when something opens and discarded when it ends; the drain takes a
    snapshot and waits until none of it is open any more. Event-loop only."""

    def __init__(self) -> None:
        self._open: set[Hashable] = set()
        self._changed = asyncio.Event()

    def add(self, key: Hashable) -> None:
        self._open.add(key)

    def discard(self, key: Hashable) -> None:
        self._open.discard(key)
        self._changed.set()

    def snapshot(self) -> set[Hashable]:
        """The keys open now."""
        return set(self._open)

    async def wait_closed(self, keys: set[Hashable], timeout: float) -> bool:
        """Wait (at most `timeout` s) until none of `keys` is open; False on the timeout."""
        try:
            async with asyncio.timeout(timeout):
                while keys & self._open:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True
