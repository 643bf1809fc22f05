"""Accepted requests on their way to and through the step thread.

Frontend threads `put` requests and `abort` them; the step thread `take`s the
messages in order. The in-flight registry holds every accepted request until
its terminal event is produced (each of its samples' when it has several):
from any thread it answers whether an id is in use, how many requests are in
flight and whether the engine is idle. The
scheduler's own table is the step thread's and holds only what it was given,
so a request the step thread has not taken yet is in flight here alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import DuplicateRequestError, EngineUnavailableError
from .events import Ending
from .request import Request


@dataclass(frozen=True, slots=True)
class Abort:
    """Ask the step thread to end a request."""

    request_id: str
    ending: Ending


class Inbox:
    """The inbox of the step thread and the registry of requests in flight."""

    def __init__(self) -> None:
        self._messages: queue.SimpleQueue[Request | Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._changed = threading.Condition()  # the registry emptied or delivery ended
        # accepted, by id: the samples whose terminal event is not produced yet
        self._in_flight: dict[str, list[Request]] = {}
        self._delivering = False  # the step thread is handing out events of finished requests
        self._open = False

    # -- frontend threads ---------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether `put` takes new requests."""
        return self._open

    def open(self) -> None:
        with self._changed:
            self._open = True

    def close(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        with self._changed:
            self._open = False

    def put(self, req: Request, admit: Callable[[int], None]) -> None:
        """Register `req` (and the samples it holds) as in flight and queue it for the
        step thread.

        Under the registry's lock, `admit(num_in_flight)` may raise to refuse
        the request; so do a closed inbox (EngineUnavailableError) and an id
        already in flight (DuplicateRequestError). Nothing is registered then.
        """
        with self._changed:
            if not self._open:
                raise EngineUnavailableError("the engine is not accepting requests")
            if req.request_id in self._in_flight:
                raise DuplicateRequestError(f"request_id: {req.request_id!r} is already in flight")
            admit(len(self._in_flight))
            self._in_flight[req.request_id] = [req, *req.followers]
        self._messages.put(req)
        self._wake.set()

    def abort(self, request_id: str, ending: Ending) -> None:
        """Queue an abort; the step thread ignores ids it does not hold."""
        self._messages.put(Abort(request_id, ending))
        self._wake.set()

    def wake(self) -> None:
        """Wake the step thread without a message (e.g. to see that it should stop)."""
        self._wake.set()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is in flight and no delivery is under way; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._in_flight and not self._delivering, timeout
            )

    def __len__(self) -> int:
        """Requests in flight."""
        return len(self._in_flight)

    def snapshot(self) -> dict[str, list[Request]]:
        """Every request in flight: its samples not finished yet, by id."""
        with self._changed:
            return {rid: list(samples) for rid, samples in self._in_flight.items()}

    # -- the step thread ------------------------------------------------------------------
    def take(self) -> Iterator[Request | Abort]:
        """The queued messages, oldest first, without waiting."""
        while True:
            try:
                yield self._messages.get_nowait()
            except queue.Empty:
                return

    def wait(self, timeout: float) -> None:
        """Sleep until a message arrives or `wake` is called (at most `timeout` seconds)."""
        self._wake.wait(timeout)
        self._wake.clear()  # safe: the caller takes the messages next

    def forget(self, finished: list[Request]) -> None:
        """Take samples whose terminal events were produced out of the registry, before
        their events go out: an id is free again once its last sample is out (a client may
        reuse it as soon as it sees its last finish). The engine counts as busy until
        `done_delivering`."""
        with self._changed:
            for req in finished:
                samples = self._in_flight.get(req.request_id, [])
                if any(s is req for s in samples):
                    samples[:] = [s for s in samples if s is not req]
                    if not samples:
                        del self._in_flight[req.request_id]
            self._delivering = True

    def done_delivering(self) -> None:
        with self._changed:
            self._delivering = False
            self._changed.notify_all()

    def fail(self) -> list[Request]:
        """Close and return every request in flight (the step thread is dying); the engine
        counts as busy until `clear`, once the caller gave each its terminal event."""
        with self._changed:
            self._open = False
            self._delivering = True
            return [req for samples in self._in_flight.values() for req in samples]

    def clear(self) -> None:
        """Empty the registry (every request was given its terminal event) and end delivery."""
        with self._changed:
            self._in_flight.clear()
            self._delivering = False
            self._changed.notify_all()
