"""Which request holds each KV row; active rows are always the leading ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..worker.plan import RowMove
from .request import Request


class RowTable:
    """Row allocation for the slot KV cache.

    Rows 0..n-1 are held by running requests in order; `allocate` takes row n,
    `free` fills each hole by moving the last row down, and returns the KV
    moves the worker must apply before its next forward.
    """

    def __init__(self, rows: int) -> None:
        self.capacity = rows
        self._rows: list[Request] = []

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._rows)

    @property
    def has_free_row(self) -> bool:
        return len(self._rows) < self.capacity

    def allocate(self, req: Request) -> int:
        """Give `req` the next row (requests that fit a row: `Scheduler.add` checks)."""
        if not self.has_free_row:
            raise RuntimeError(f"no row for request {req.request_id}")
        self._rows.append(req)
        return len(self._rows) - 1

    def release_last(self, req: Request) -> bool:
        """Give back the last row if `req` holds it (undoing `allocate`); no KV moves needed."""
        if not self._rows or self._rows[-1] is not req:
            return False
        self._rows.pop()
        return True

    def free(self, rows: Iterable[int]) -> list[RowMove]:
        """Release `rows`, compacting the table; return the KV moves, in order."""
        moves: list[RowMove] = []
        for row in sorted(set(rows), reverse=True):  # highest first: each hole gets a live row
            last = self._rows.pop()
            if row < len(self._rows):
                self._rows[row] = last
                last.row = row
                moves.append(RowMove(src=len(self._rows), dst=row, length=last.kv_len))
        return moves
