"""Which HTTP requests are still being answered: ASGI middleware the drain uses, so that
answers in progress (a stream's last chunks) reach their clients before the process ends."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


class OpenRequests:
    """Wraps an ASGI app; counts each HTTP request from its start until its answer is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._open: set[Any] = set()  # the scope of each request being answered
        self._changed = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._open.add(id(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            self._open.discard(id(scope))
            self._changed.set()

    def snapshot(self) -> set[Any]:
        """The requests open now."""
        return set(self._open)

    async def wait_closed(self, requests: set[Any], timeout: float) -> bool:
        """Wait (at most `timeout` s) until every request in `requests` has been answered."""
        try:
            async with asyncio.timeout(timeout):
                while requests & self._open:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True
