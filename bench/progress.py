"""Progress lines on stderr while a long benchmark runs."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Timestamped lines: one per event, token counts at most every `interval_s` per run.

    Safe to call from several threads (the engine reports from its step thread).
    """

    def __init__(
        self, stream: TextIO | None = None, interval_s: float = 10.0, label: str = "w1"
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.label = label  # the benchmark's name, at the start of every line
        self._started = time.perf_counter()
        self._last_tick: dict[str, float] = {}
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        """Write one line now."""
        elapsed = time.perf_counter() - self._started
        with self._lock:
            print(f"[{self.label} {elapsed:8.1f}s] {message}", file=self.stream, flush=True)

    def tokens(self, run: str, done: int, total: int, since: float) -> None:
        """Report `done` of `total` tokens for `run` (started at perf_counter `since`), if due."""
        now = time.perf_counter()
        with self._lock:
            last = self._last_tick.get(run, since)
            if now - last < self.interval_s:
                return
            self._last_tick[run] = now
        rate = done / (now - since) if now > since else 0.0
        self.say(f"{run}: {done:,}/{total:,} tokens, {rate:.1f} tok/s so far")
