"""Prompt prefix caching in spare KV rows.

Requests often share the beginning of their prompt (a chat template's system
prompt, few-shot examples). The cache keeps the KV of a few recent prompts in
spare rows of the slot KV cache, past the rows running requests use. When a
request is admitted, the longest prefix its prompt shares with a cached
prompt is copied into its row (a `RowMove`) and only the rest of the prompt is
prefilled. After a prefill, the prompt is saved into the least recently used
spare row (another `RowMove`, applied at the start of the next step, before
the rows are compacted).

Policy only: the copies are plain row moves, which the worker already applies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..worker.plan import RowMove


@dataclass(slots=True)
class _Entry:
    row: int  # spare KV row holding this prompt's KV
    tokens: list[int] = field(default_factory=list)  # the prompt cached there ([] = empty)
    last_used: int = 0


class PrefixCache:
    """Longest-prefix reuse of recent prompts' KV; `rows` spare rows from `first_row` on."""

    def __init__(self, first_row: int, rows: int, min_tokens: int = 8) -> None:
        self.min_tokens = min_tokens  # shorter matches are not worth a copy
        self._entries = [_Entry(row=first_row + i) for i in range(rows)]
        self._clock = itertools.count(1)

    def clear(self) -> None:
        """Forget every cached prompt (their KV copies may not have happened)."""
        for entry in self._entries:
            entry.tokens = []
            entry.last_used = 0

    def match(self, prompt: list[int]) -> tuple[int, int] | None:
        """The spare row holding `prompt`'s longest cached prefix, and that prefix's length.

        At least one prompt token is always left to prefill (its logits give
        the first new token). Looking changes nothing; `use` marks a reuse.
        """
        best: tuple[_Entry, int] | None = None
        for entry in self._entries:
            n = min(_common_prefix_len(entry.tokens, prompt), len(prompt) - 1)
            if n >= self.min_tokens and (best is None or n > best[1]):
                best = (entry, n)
        return None if best is None else (best[0].row, best[1])

    def use(self, row: int) -> None:
        """The cached prefix in spare `row` was just reused (for the LRU order)."""
        for entry in self._entries:
            if entry.row == row:
                entry.last_used = next(self._clock)

    def save(self, prompt: list[int], row: int) -> RowMove | None:
        """Cache the prompt just prefilled in `row`; return the copy into a spare row, if any."""
        if not self._entries or len(prompt) < self.min_tokens:
            return None
        for entry in self._entries:
            if _common_prefix_len(entry.tokens, prompt) == len(prompt):
                entry.last_used = next(self._clock)  # already cached (or a longer prompt is)
                return None
        victim = min(self._entries, key=lambda e: e.last_used)
        victim.tokens = list(prompt)
        victim.last_used = next(self._clock)
        return RowMove(src=row, dst=victim.row, length=len(prompt))


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by binary search on slice equality (C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
