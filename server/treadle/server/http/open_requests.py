"""Which HTTP requests are still being answered: ASGI middleware the drain uses, so that
answers in progress (a stream's last chunks) reach their clients before the process ends."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..open_set import OpenSet


class OpenRequests:
    """Wraps an ASGI app; counts each HTTP request from its start until its answer is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests = OpenSet()  # the id of each request's scope while it is answered
        self.snapshot = self.requests.snapshot
        self.wait_closed = self.requests.wait_closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests.add(id(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            self.requests.discard(id(scope))
