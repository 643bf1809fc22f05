"""The waiting queue: higher priority first, then arrival order."""

from __future__ import annotations

import heapq
import itertools

from .request import Request


class WaitingQueue:
    """Requests waiting for a row. Removal of a cancelled request is lazy (O(1))."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []
        self._order = itertools.count()
        self._live: set[Request] = set()  # by identity: an id may come back after a cancel

    def __len__(self) -> int:
        return len(self._live)

    def push(self, req: Request) -> None:
        heapq.heappush(self._heap, (-req.priority, next(self._order), req))
        self._live.add(req)

    def peek(self) -> Request | None:
        self._drop_removed()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Request:
        self._drop_removed()
        req = heapq.heappop(self._heap)[2]
        self._live.discard(req)
        return req

    def remove(self, req: Request) -> None:
        """Forget `req`; it is skipped when it reaches the head."""
        self._live.discard(req)

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0][2] not in self._live:
            heapq.heappop(self._heap)
