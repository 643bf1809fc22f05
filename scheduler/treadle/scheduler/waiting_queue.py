"""The waiting queue: earliest virtual arrival first, where priority buys a head start.

A request's place is `arrival - priority * priority_step`: one priority
step is worth `priority_step` seconds of waiting. Equivalently, its
effective priority grows by one every `priority_step` seconds it waits
(`now` cancels out, so a static heap key is exact). Among requests arriving
close together, higher priority goes first; a flood at priority +10 keeps a
priority-0 request waiting at most `10 * priority_step` seconds (ageing:
nothing starves).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator

from .engine_config import DEFAULT_PRIORITY_STEP
from .request import Request

_STALE_SLACK = 16  # removed entries tolerated in the heap beyond the live ones


class WaitingQueue:
    """Requests waiting to run.

    `remove` takes a request out at once (it no longer counts, and is never
    popped); its heap entry is dropped lazily, and the heap is rebuilt when
    removed entries outnumber live ones, so memory stays bounded by the live
    requests (amortised O(1) per removal).
    """

    def __init__(self, priority_step: float = DEFAULT_PRIORITY_STEP) -> None:
        if not (0 < priority_step < math.inf):
            raise ValueError(f"priority_step: must be a positive number, got {priority_step}")
        self.priority_step = priority_step
        self._heap: list[tuple[float, int, Request]] = []  # (virtual arrival, order, request)
        self._order = itertools.count()
        self._live: set[Request] = set()  # by identity: an id may come back after a cancel

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        """The live requests, in no particular order."""
        return iter(list(self._live))

    def key(self, req: Request) -> float:
        """`req`'s virtual arrival: the smaller, the sooner it is served (and the later it
        is preempted)."""
        return req.arrival - req.priority * self.priority_step

    def push(self, req: Request) -> None:
        """Queue `req` at its virtual arrival (ties: in push order; a preempted request
        comes back at its own, ahead of everything that arrived after it)."""
        heapq.heappush(self._heap, (self.key(req), next(self._order), req))
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
        """Take `req` out of the queue (no-op if it is not queued)."""
        self._live.discard(req)
        if not self.is_pruned:
            self._heap = [e for e in self._heap if e[2] in self._live]
            heapq.heapify(self._heap)

    @property
    def is_pruned(self) -> bool:
        """Removed entries do not outnumber the live ones (what `remove` keeps true)."""
        return len(self._heap) <= 2 * len(self._live) + _STALE_SLACK

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0][2] not in self._live:
            heapq.heappop(self._heap)
